"""Autoregressive decoding of the caption generator's GPT-2 with a KV cache.

CgT-GAN (arXiv:2308.12045) draws K captions per image at every training step (Sec. 3.4) and decodes
greedily at test time, so decoding is in the inner loop. Two caches serve CaptionGenerator._decode
through one interface, `start(embeds) -> logits`, `step(tokens) -> logits`, `keep(rows)`:

- `LeanCache` runs transformers' GPT2LMHeadModel from its own submodules (wte, wpe, h[i].ln_1,
  h[i].attn.c_attn/c_proj, h[i].ln_2, h[i].mlp, ln_f, lm_head), nanoGPT style, with the keys and
  values of all layers in one preallocated tensor. It skips the per-call work of the full forward
  (Cache objects, mask building, output classes), which dominates at ShapesWorld's tiny size.
  The model and its parameter names are untouched, so checkpoints load as they are.
- `HFCache` calls the full forward with transformers' own cache: the fallback for configurations
  the lean step does not reproduce (see `lean_supported`), and the reference the tests check it by.

Shape legend: N rows being decoded (n of them still running), P prefix tokens, S = P + T positions,
T new tokens, E GPT-2 width, H heads, d = E / H head width, L layers, V vocabulary.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F


def dropout_active(module: torch.nn.Module) -> bool:
    """Whether a forward of module draws dropout masks: training mode and some nn.Dropout with
    p > 0 (the modules' own p, which is what the forward applies; a config edited after loading
    is not)."""
    return module.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0
                                   for m in module.modules())


def lean_supported(gpt) -> bool:
    """Whether LeanCache computes exactly what gpt's own forward computes.

    Refused: other model types, cross-attention, upcast-and-reordered attention (a different
    rounding under autocast), and dropout that is active (training mode with p > 0).
    """
    cfg = gpt.config
    return (cfg.model_type == "gpt2" and not cfg.add_cross_attention
            and not cfg.reorder_and_upcast_attn and not dropout_active(gpt))


def attention_scale(cfg, layer: int) -> float:
    """GPT-2's factor on q k^T: 1/sqrt(d) if scale_attn_weights, then / (layer + 1) if
    scale_attn_by_inverse_layer_idx. Read from the config: transformers versions differ in where
    the attention module keeps it."""
    scale = (cfg.n_embd // cfg.n_head) ** -0.5 if cfg.scale_attn_weights else 1.0
    return scale / (layer + 1) if cfg.scale_attn_by_inverse_layer_idx else scale


def kv_cache(gpt, max_new: int):
    """The fastest exact cache for gpt: LeanCache when supported, else HFCache."""
    return LeanCache(gpt, max_new) if lean_supported(gpt) else HFCache(gpt)


class LeanCache:
    """GPT-2 decoding over the model's own weights with one preallocated (L, 2, N, H, S, d) cache.

    Per layer (Radford et al. 2019, pre-norm): x = x + c_proj(attn(ln_1(x))); x = x + mlp(ln_2(x)),
    with attn = softmax(q k^T * scaling) v over the cached positions; logits = lm_head(ln_f(x)).
    Device and dtype follow the inputs (the cache takes the dtype of the keys, bf16 under autocast).
    """

    def __init__(self, gpt, max_new: int):
        self.gpt, self.max_new = gpt, max_new
        self.cache, self.shape, self.pos = None, None, 0
        # gelu_new is GELU's tanh approximation; torch's fused kernel is one op instead of six.
        tanh = gpt.config.activation_function in ("gelu_new", "gelu_pytorch_tanh")
        self.act = gpt.transformer.h[0].mlp.act
        if tanh:
            self.act = lambda x: F.gelu(x, approximate="tanh")

    def start(self, embeds: torch.Tensor) -> torch.Tensor:
        """Prefix embeddings (N, P, E) -> next-token logits (N, V)."""
        tr = self.gpt.transformer
        n, p, e = embeds.shape
        heads = tr.config.n_head
        # Allocated by the first layer, which knows the keys' dtype (bf16 under autocast).
        self.cache, self.pos = None, 0
        self.shape = (len(tr.h), 2, n, heads, p + self.max_new, e // heads)  # (L, 2, N, H, S, d)
        return self._forward(embeds + tr.wpe.weight[:p])  # (N, V)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Last drawn tokens (n,) of the rows still running -> their next-token logits (n, V)."""
        tr = self.gpt.transformer
        return self._forward((tr.wte.weight[tokens] + tr.wpe.weight[self.pos])[:, None])  # (n, V)

    def keep(self, rows: torch.Tensor) -> None:
        """Drop finished rows: keep these (n',) indices into the current rows."""
        self.cache = self.cache[:, :, rows]  # (L, 2, n', H, S, d)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (n, t, E) at positions pos..pos+t-1 -> logits (n, V) of the last one."""
        for layer, block in enumerate(self.gpt.transformer.h):
            x = x + self._attention(layer, block.attn, block.ln_1(x))
            mlp = block.mlp
            x = x + mlp.c_proj(self.act(mlp.c_fc(block.ln_2(x))))
        self.pos += x.shape[1]
        return self.gpt.lm_head(self.gpt.transformer.ln_f(x[:, -1]))  # (n, V)

    def _attention(self, layer: int, attn, x: torch.Tensor) -> torch.Tensor:
        """Causal self-attention of x (n, t, E) over the cache and x; caches x's keys and values."""
        n, t, e = x.shape
        qkv = attn.c_attn(x).view(n, t, 3, attn.num_heads, attn.head_dim)  # (n, t, 3, H, d)
        q = qkv[:, :, 0].transpose(1, 2)  # (n, H, t, d)
        kv = qkv[:, :, 1:].permute(2, 0, 3, 1, 4)  # (2, n, H, t, d)
        if self.cache is None:
            self.cache = kv.new_empty(self.shape)  # (L, 2, N, H, S, d)
        end = self.pos + t
        self.cache[layer, :, :, :, self.pos:end] = kv
        k, v = self.cache[layer, :, :, :, :end]  # (n, H, pos+t, d) each
        # Prefill (t > 1) starts at position 0, so top-left causal alignment is GPT-2's mask; a
        # single new token sees every cached position.
        scale = attention_scale(self.gpt.config, layer)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=scale)  # (n, H, t, d)
        return attn.c_proj(y.transpose(1, 2).reshape(n, t, e))  # (n, t, E)


class HFCache:
    """The same interface over gpt's full forward and transformers' own KV cache."""

    def __init__(self, gpt):
        self.gpt, self.cache = gpt, None
        # transformers renamed `past_key_values` to `cache` in 5.x; support both.
        params = inspect.signature(gpt.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        # Only the last position's logits are needed; older forwards lack the argument.
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def start(self, embeds: torch.Tensor) -> torch.Tensor:
        """Prefix embeddings (N, P, E) -> next-token logits (N, V)."""
        return self._read(self.gpt(inputs_embeds=embeds, use_cache=True, **self.last_only))

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Last drawn tokens (n,) of the rows still running -> their next-token logits (n, V)."""
        return self._read(self.gpt(input_ids=tokens[:, None], use_cache=True,
                                   **{self.cache_kw: self.cache}))

    def keep(self, rows: torch.Tensor) -> None:
        """Drop finished rows: keep these (n',) indices into the current rows."""
        if hasattr(self.cache, "batch_select_indices"):
            self.cache.batch_select_indices(rows)
        else:  # legacy tuples of (key, value) per layer
            self.cache = tuple(tuple(x[rows] for x in layer) for layer in self.cache)

    def _read(self, out) -> torch.Tensor:
        self.cache = out.get("cache") or out.get("past_key_values")
        return out.logits[:, -1]  # (n, V)
