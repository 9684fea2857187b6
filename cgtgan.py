"""CgT-GAN: CLIP-guided Text GAN for image captioning -- the method and the command line.

Implements Yu et al., "CgT-GAN: CLIP-guided Text GAN for Image Captioning" (ACM MM 2023,
arXiv:2308.12045). Sec. 3.1: a frozen CLIP image embedding goes through a mapping network into P
"visual prompt" embeddings that prefix GPT-2 (the generator). Sec. 3.2: a RoBERTa discriminator
tells corpus sentences from generated captions and its logit is the naturalness reward. Sec. 3.3:
CLIP-cos and CLIP-agg rewards score the caption against the image. Sec. 3.4: self-critical policy
gradient with the greedy caption as baseline, lambda mixing semantic and naturalness rewards.

This file holds the nouns and equations; train.py holds the loops and the stages; runs.py the run
folder; decoding.py holds the GPT-2 KV-cache step behind the decoding methods.
`python cgtgan.py train` runs the ShapesWorld demo end to end (see `main` at the bottom).

Shape legend: B images, K samples per image, T tokens, P prefix tokens, D CLIP embedding width,
E GPT-2 width, H RoBERTa width, V vocabulary, M corpus sentences, N sequences (B*K or B).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import decoding

# Labels at padding positions; cross-entropy skips them. Never 0: that is GPT-2's token "!".
IGNORE_INDEX = -1


class ConfigError(ValueError):
    """A one-line, user-facing problem with a config, a checkpoint or a command-line argument."""


# ----------------------------------------------------------------------------------------------
# Configs: one dataclass per component, defaults that run the ShapesWorld demo on a laptop CPU.


@dataclass
class GeneratorConfig:
    prefix_len: int = 5  # P visual prompt tokens (the paper: 10)
    mapping_hidden: int = 0  # hidden width of the mapping MLP; 0 means P*E/2 as in ClipCap
    pretrained: str = ""  # GPT-2 directory (or hub name); "" builds the small model below
    n_layer: int = 2
    n_embd: int = 96  # E
    n_head: int = 4
    dropout: float = 0.0
    max_len: int = 20  # the paper caps captions at 20 tokens
    end_token: str = "."  # the paper ends captions at "."


@dataclass
class DiscriminatorConfig:
    pretrained: str = ""  # RoBERTa directory (or hub name); "" builds the small model below
    n_layer: int = 2
    hidden: int = 64  # H
    n_head: int = 2
    dropout: float = 0.1


@dataclass
class InitConfig:
    """Text-only initialisation (Sec. 3.1): reconstruct corpus sentences from their CLIP text embedding."""

    steps: int = 600
    batch: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    noise: float = 0.0  # std of Gaussian noise on the text embedding (CapDec); off as in the paper


@dataclass
class GANConfig:
    """Adversarial self-critical training on unpaired images (Sec. 3.4)."""

    steps: int = 300
    batch: int = 16  # B images per step
    k: int = 5  # K samples per image (and K real sentences per image for the discriminator)
    lr: float = 1e-4
    d_lr: float = 1e-3  # from scratch the discriminator must learn fast to keep captions fluent
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    reward: str = "agg+gan"  # cos | agg | agg+gan | gan (the paper's ablations)
    agg_weight: float = 1.0  # semantic reward = w * CLIP-agg + (1 - w) * CLIP-cos when "agg" in reward
    temperature: float = 100.0  # t of the CLIP-agg softmax
    baseline: str = "greedy"  # greedy | loo (leave-one-out mean of the other samples)
    lambda_hold: int = 30  # steps with lambda = 0 (naturalness reward only)
    lambda_ramp: int = 120  # steps of the linear ramp to lambda_final
    lambda_final: float = 0.5
    eval_every: int = 100  # validation CIDEr-D every this many steps (best checkpoint kept)
    eval_images: int = 300  # validation images used (0: all)
    ckpt_every: int = 50


@dataclass
class Config:
    name: str = ""  # run folder runs/<name>; "" derives one from the data, reward and seed
    runs_dir: str = "runs"
    data: str = "shapesworld"  # shapesworld | real (a paper-scale dataset made by `prepare`)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: bool = False  # bf16 autocast on CUDA
    # torch CPU threads; 0 keeps torch's default. One thread is fastest for the tiny ShapesWorld
    # models on a 2-core machine (measured: 2 threads ran an init step several times slower when
    # other jobs shared the cores). Raise it for larger models on a many-core CPU.
    threads: int = 1
    decode: str = "greedy"  # greedy | beam (evaluation only)
    gen: GeneratorConfig = field(default_factory=GeneratorConfig)
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    init: InitConfig = field(default_factory=InitConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    world: dict = field(default_factory=dict)  # ShapesWorldConfig overrides (world.FIELD=VALUE)
    real: dict = field(default_factory=dict)  # realdata.RealDataConfig overrides (real.FIELD=VALUE)


# The paper's settings (Sec. 4.1): ViT-L/14 features, GPT-2 124M with a prefix of 10, RoBERTa-base,
# batch 64, K = 5, lr 1e-5 (initialisation 2e-5), 20 tokens; t per corpus as the authors used.
# Models and data are read from local directories (real.* are realdata.RealDataConfig fields).
_PAPER = {"data": "real", "real.clip": "ViT-L/14", "real.gpt2": "models/gpt2",
          "real.roberta": "models/roberta-base", "gen.prefix_len": 10, "gen.dropout": 0.0,
          "gan.batch": 64, "gan.k": 5, "gan.lr": 1e-5, "gan.d_lr": 1e-5, "init.lr": 2e-5,
          "init.batch": 64, "init.steps": 30000, "gan.steps": 20000, "gan.eval_every": 1000,
          "gan.eval_images": 0, "gan.ckpt_every": 500, "gan.lambda_hold": 150,
          "gan.lambda_ramp": 2350, "gan.weight_decay": 0.05, "init.weight_decay": 0.05}
_COCO = {"real.split_file": "data/dataset_coco.json", "real.image_root": "data/coco"}
_FLICKR = {"real.split_file": "data/dataset_flickr30k.json", "real.image_root": "data/flickr30k"}
PRESETS = {
    "coco": {**_PAPER, **_COCO, "real.setting": "coco/coco", "gan.temperature": 100.0},
    "flickr30k": {**_PAPER, **_FLICKR, "real.setting": "flickr30k/flickr30k",
                  "gan.temperature": 125.0},
    "coco-shutterstock": {**_PAPER, **_COCO, "real.corpus": "data/shutterstock.txt",
                          "real.setting": "coco/shutterstock", "gan.temperature": 100.0},
    "coco-flickr30k": {**_PAPER, **_COCO, "real.corpus": "data/flickr30k_captions.txt",
                       "real.setting": "coco/flickr30k", "gan.temperature": 125.0},
    "coco-gcc": {**_PAPER, **_COCO, "real.corpus": "data/gcc.txt", "real.setting": "coco/gcc",
                 "gan.temperature": 175.0},
    # ZS-IC: nothing in-domain in training. Web images (a Karpathy-format file listing them, all
    # "train") and the GCC corpus; validation and the test table on COCO's Karpathy split, as the
    # official code validates its GCC run on COCO; `eval --dataset flickr30k` scores Flickr30k.
    "zsic": {**_PAPER, "real.split_file": "data/dataset_web.json", "real.image_root": "data/web",
             "real.corpus": "data/gcc.txt", "real.setting": "web/gcc", "gan.temperature": 175.0,
             "real.eval_split_file": _COCO["real.split_file"],
             "real.eval_image_root": _COCO["real.image_root"]},
}

# `eval --dataset NAME`: score a paper-scale run on this dataset's Karpathy split (ZS-IC).
EVAL_DATASETS = {name: {"real.eval_split_file": paths["real.split_file"],
                        "real.eval_image_root": paths["real.image_root"]}
                 for name, paths in (("coco", _COCO), ("flickr30k", _FLICKR))}


def _parse_value(key: str, text: str, kind):
    """A command-line string as the field's type; bools only from true/false/1/0/yes/no."""
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{key} takes true or false, not {text!r}")
        return text.lower() in ("true", "1", "yes")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{key} takes a {kind.__name__}, not {text!r}") from None


def apply_overrides(cfg: Config, overrides: dict[str, object]) -> Config:
    """Set dotted fields (`gan.lr`, `seed`, `world.n_train`) with type checks; unknown keys refused.

    Values may be strings (from `--set key=value`) or already typed (presets).
    """
    for key, value in overrides.items():
        parts = key.split(".")
        if parts[0] in ("world", "real") and len(parts) == 2:
            # Checked against ShapesWorldConfig / RealDataConfig when the data is loaded.
            getattr(cfg, parts[0])[parts[1]] = value
            continue
        target = cfg
        for part in parts[:-1]:
            if not is_dataclass(getattr(target, part, None)):
                raise ConfigError(f"unknown config key {key!r}")
            target = getattr(target, part)
        types = {f.name: f.type for f in fields(target)}
        if parts[-1] not in types or is_dataclass(getattr(target, parts[-1])):
            raise ConfigError(f"unknown config key {key!r}; valid keys: "
                              + ", ".join(sorted(_flat_keys(cfg))))
        kind = {"int": int, "float": float, "str": str, "bool": bool}[types[parts[-1]]]
        if isinstance(value, str):
            value = _parse_value(key, value, kind)
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{key} takes a {kind.__name__}, not {value!r}")
        setattr(target, parts[-1], value)
    return cfg


def _flat_keys(obj, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        keys += _flat_keys(value, f"{prefix}{f.name}.") if is_dataclass(value) else [prefix + f.name]
    return keys


# ----------------------------------------------------------------------------------------------
# Modules


class MappingNetwork(nn.Module):
    """Sec. 3.1: a 2-layer MLP with tanh from a CLIP embedding (B, D) to P prefix embeddings (B, P, E)."""

    def __init__(self, clip_dim: int, embed_dim: int, prefix_len: int, hidden: int = 0):
        super().__init__()
        self.prefix_len, self.embed_dim = prefix_len, embed_dim
        hidden = hidden or prefix_len * embed_dim // 2
        self.model = nn.Sequential(nn.Linear(clip_dim, hidden), nn.Tanh(),
                                   nn.Linear(hidden, prefix_len * embed_dim))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.model(feats).view(-1, self.prefix_len, self.embed_dim)  # (B, P, E)


class CaptionGenerator(nn.Module):
    """Sec. 3.1: MappingNetwork prefix + transformers' GPT2LMHeadModel (submodule `gpt`, unrenamed).

    `forward(feats (N, D), tokens (N, T)) -> logits (N, T, V)`, where logits[:, i] predicts
    tokens[:, i] from the prefix and tokens[:, :i]. Decoding: `greedy`, `sample`, `beam_search`.
    """

    def __init__(self, mapping: MappingNetwork, gpt, end_id: int, max_len: int = 20):
        super().__init__()
        self.mapping, self.gpt = mapping, gpt
        self.end_id, self.max_len = end_id, max_len

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        prefix = self.mapping(feats)  # (N, P, E)
        embeds = torch.cat([prefix, self.gpt.transformer.wte(tokens)], dim=1)  # (N, P+T, E)
        logits = self.gpt(inputs_embeds=embeds).logits  # (N, P+T, V)
        return logits[:, prefix.shape[1] - 1:-1]  # (N, T, V)

    def log_probs(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log p(tokens[:, i] | prefix, tokens[:, :i]) for every position: (N, T), with gradient."""
        return token_log_probs(self.forward(feats, tokens), tokens)

    @torch.no_grad()
    def greedy(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Argmax decoding. feats (B, D) -> (ids (B, T), mask (B, T)); mask is 1 up to the end token."""
        return self._decode(feats, lambda logits, rows, t: logits.argmax(-1))

    def sample(self, feats: torch.Tensor, k: int, generator: torch.Generator | None = None):
        """K captions per image from the model's own distribution (temperature 1).

        feats (B, D) -> ids (B, K, T), log-probs (B, K, T) WITH gradient, mask (B, K, T) float.
        Tokens are drawn under no_grad with a KV cache (`draw`), then one teacher-forced pass over
        prefix + sampled tokens gives exactly the log-probs the sampler used, now differentiable.
        """
        rep = feats.repeat_interleave(k, dim=0)  # (B*K, D)
        ids, mask = self.draw(rep, generator)  # (B*K, T)
        logp = self.log_probs(rep, ids) * mask  # (B*K, T)
        shape = (feats.shape[0], k, ids.shape[1])
        return ids.view(shape), logp.view(shape), mask.view(shape)  # (B, K, T) each

    @torch.no_grad()
    def draw(self, feats: torch.Tensor, generator: torch.Generator | None = None,
             uniforms: torch.Tensor | None = None, greedy_rows: torch.Tensor | None = None):
        """One sampled caption per row of feats (N, D) -> (ids (N, T), mask (N, T)), no gradient.

        The uniform numbers behind the draws, (N, max_len), are taken up front (or given), so a
        row's caption does not depend on when the other rows stop: data-parallel ranks that each
        take their rows of one global draw reproduce a single process exactly. Rows flagged in
        greedy_rows (N,) bool take the argmax instead, so the self-critical baseline decodes in
        the same batch as the samples (one decoding loop per step instead of two).
        """
        if uniforms is None:
            uniforms = torch.rand(feats.shape[0], self.max_len, generator=generator)
        uniforms = uniforms.to(feats.device)

        def choose(logits, rows, t):
            token = sample_categorical(logits, uniforms[rows, t])  # (n',)
            if greedy_rows is None:
                return token
            return torch.where(greedy_rows.to(token.device)[rows], logits.argmax(-1), token)
        return self._decode(feats, choose)

    @torch.no_grad()
    def beam_search(self, feats: torch.Tensor, beams: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
        """Beam search (inference only) by length-normalised log-prob. feats (B, D) -> (ids, mask)."""
        results = []
        for f in feats:
            seqs, scores, done = [[]], torch.zeros(1), []
            for _ in range(self.max_len):
                tokens = torch.tensor(seqs, dtype=torch.long, device=feats.device).view(len(seqs), -1)
                rep = f.expand(len(seqs), -1)  # (b, D)
                embeds = torch.cat([self.mapping(rep), self.gpt.transformer.wte(tokens)], 1)
                logp = self.gpt(inputs_embeds=embeds).logits[:, -1].float().log_softmax(-1).cpu()
                top = (scores[:, None] + logp).view(-1).topk(beams)  # over (b*V)
                seqs_next, scores_next = [], []
                for score, flat in zip(top.values.tolist(), top.indices.tolist()):
                    seq = seqs[flat // logp.shape[1]] + [flat % logp.shape[1]]
                    if seq[-1] == self.end_id:
                        done.append((score / len(seq), seq))
                    else:
                        seqs_next.append(seq)
                        scores_next.append(score)
                if not seqs_next or len(done) >= beams:
                    break
                seqs, scores = seqs_next, torch.tensor(scores_next)
            done += [(s / len(q), q) for s, q in zip(scores.tolist(), seqs)]
            results.append(max(done)[1])
        return _pad(results, self.end_id, feats.device)

    def _decode(self, feats: torch.Tensor, choose) -> tuple[torch.Tensor, torch.Tensor]:
        """Autoregressive decoding with a KV cache. feats (N, D) -> (ids (N, T), mask (N, T)).

        `choose(logits (n, V), rows (n,), t) -> (n,)` picks the tokens of the rows still being
        decoded. A row that emits the end token leaves the batch (and its cache), so the model
        only runs on unfinished captions (generate() keeps computing finished rows). The cache is
        decoding.LeanCache, a lean GPT-2 step over the model's own weights, when it is exact for
        this model (else transformers' forward and cache): at ShapesWorld's size the per-call
        overhead of the full forward, not the FLOPs, dominates.
        """
        n = feats.shape[0]
        ids = torch.full((n, self.max_len), self.end_id, dtype=torch.long, device=feats.device)
        mask = torch.zeros(n, self.max_len, device=feats.device)
        rows = torch.arange(n, device=feats.device)  # (n',) rows still being decoded
        cache = decoding.kv_cache(self.gpt, self.max_len)
        logits = cache.start(self.mapping(feats))  # (N, V)
        for t in range(self.max_len):
            token = choose(logits.float(), rows, t)  # (n',)
            ids[rows, t], mask[rows, t] = token, 1.0
            keep = token != self.end_id  # (n',)
            if not keep.any():
                break
            if not keep.all():
                index = keep.nonzero().squeeze(1)  # (n'',)
                cache.keep(index)
                rows, token = rows[index], token[index]
            logits = cache.step(token)  # (n', V)
        return ids[:, :t + 1], mask[:, :t + 1]  # (N, T), (N, T)


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) at the given tokens: (N, T, V), (N, T) -> (N, T)."""
    return logits.float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def sample_categorical(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Exact draws from softmax(logits) (N, V) -> (N,) by inverting the CDF at uniforms (N,) in [0, 1).

    One uniform number per row and a binary search over the cumulative sum, instead of
    torch.multinomial (tens of milliseconds per step over a 50k vocabulary on a CPU). A token with
    probability 0 owns an empty interval of the CDF and is never drawn.
    Example: probabilities [0.2, 0.5, 0.3] have CDF [0.2, 0.7, 1.0]; u = 0.65 draws token 1.
    """
    cdf = logits.softmax(-1).cumsum(-1)  # (N, V)
    u = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]  # (N, 1), scaled by the total for rounding
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(cdf.shape[1] - 1)


def _pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged token lists -> (ids (N, T) padded with pad_id, mask (N, T) float)."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


class Discriminator(nn.Module):
    """Sec. 3.2: transformers' RobertaModel (submodule `roberta`) + an MLP head on the <s> token.

    forward(input_ids (N, T), attention_mask (N, T)) -> logits (N,): > 0 means "real sentence".
    """

    def __init__(self, roberta):
        super().__init__()
        self.roberta = roberta
        width = roberta.config.hidden_size
        self.head = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.roberta(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden[:, 0]).squeeze(-1)  # (N,)


# ----------------------------------------------------------------------------------------------
# Building the models: small ones from a tokenizer's vocabulary, or released weights by directory


def _from_pretrained(cls, name: str, what: str, download: str, **config):
    try:
        return cls.from_pretrained(name, **config)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{what} not found at {name!r} ({type(err).__name__}); download it with "
                          f"`huggingface-cli download {download} --local-dir {name}` and pass that "
                          "directory") from None


def load_tokenizer(path: str | Path, what: str):
    """A transformers tokenizer from a directory; refuses an empty one (no cached hub files)."""
    from transformers import AutoTokenizer

    repo = {"GPT-2": "gpt2", "RoBERTa": "roberta-base"}.get(what, what)  # the hub repositories
    tok = _from_pretrained(AutoTokenizer, str(path), f"{what} tokenizer", repo)
    if len(tok) == 0:
        raise ConfigError(f"{what} tokenizer at {str(path)!r} is empty; give a directory with "
                          "vocab.json and merges.txt")
    return tok


def end_token_id(tokenizer, text: str) -> int:
    """The id of the end-of-caption token ("." in the paper); it must be a single token."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(f"end token {text!r} is {len(ids)} tokens in the GPT-2 tokenizer; "
                          "choose a single-token end (e.g. --set gen.end_token=.)")
    return ids[0]


def build_generator(cfg: GeneratorConfig, tokenizer, clip_dim: int) -> CaptionGenerator:
    """CaptionGenerator for CLIP width D = clip_dim: released GPT-2 weights or a fresh small model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if cfg.pretrained:
        # Dropout set at loading: the modules take p from the config when they are built.
        drop = {"resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout}
        gpt = _from_pretrained(GPT2LMHeadModel, cfg.pretrained, "GPT-2", "gpt2", **drop)
    else:
        gpt = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tokenizer), n_positions=cfg.prefix_len + cfg.max_len + 4,
            n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id))
    mapping = MappingNetwork(clip_dim, gpt.config.n_embd, cfg.prefix_len, cfg.mapping_hidden)
    return CaptionGenerator(mapping, gpt, end_token_id(tokenizer, cfg.end_token), cfg.max_len)


def build_discriminator(cfg: DiscriminatorConfig, tokenizer) -> Discriminator:
    """Discriminator over released RoBERTa weights or a fresh small RoBERTa."""
    from transformers import RobertaConfig, RobertaModel

    if cfg.pretrained:
        roberta = _from_pretrained(RobertaModel, cfg.pretrained, "RoBERTa", "roberta-base")
        # The released weights include a pooler, which the head on <s> does not use; dropped (as
        # add_pooling_layer=False does), or DistributedDataParallel stops at the second step on
        # parameters that never receive a gradient.
        roberta.pooler = None
    else:
        roberta = RobertaModel(RobertaConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.hidden, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, intermediate_size=4 * cfg.hidden,
            max_position_embeddings=64 + 2, type_vocab_size=1, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout),
            add_pooling_layer=False)
    return Discriminator(roberta)


# ----------------------------------------------------------------------------------------------
# Rewards (Sec. 3.2-3.3): small pure functions


def naturalness_reward(logits: torch.Tensor) -> torch.Tensor:
    """r_nat = D(c), the discriminator's logit for caption c. (...) -> (...), no gradient.

    The logit (not sigmoid) keeps a useful signal when the discriminator is confident: sigmoid
    saturates at 0 for obviously fake captions, giving every sample the same reward.
    Example: logits [2.0, -1.0] -> rewards [2.0, -1.0].
    """
    return logits.detach().float()


def clip_cos_reward(image: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
    """r_cos = 100 * cos(v, t): image embeddings (B, D), caption embeddings (B, K, D) -> (B, K).

    Example: identical directions give 100, orthogonal ones 0.
    """
    return 100 * torch.einsum("bd,bkd->bk", F.normalize(image.float(), dim=-1),
                              F.normalize(caption.float(), dim=-1))


def clip_agg_target(image: torch.Tensor, corpus: torch.Tensor, t: float,
                    chunk: int = 8192) -> torch.Tensor:
    """a = sum_j softmax_j(t * cos(v, s_j)) * s_j over the whole corpus. (B, D), (M, D) -> (B, D).

    Streams the corpus in chunks with an online (running-max) softmax, so the (B, M) matrix never
    exists: per chunk, m' = max(m, max_j l_j); z = z * exp(m - m') + sum_j exp(l_j - m');
    a = a * exp(m - m') + sum_j exp(l_j - m') s_j; finally a / z. Inputs are L2-normalised.
    Example: with t -> infinity, a is the corpus sentence nearest to the image.
    """
    image = F.normalize(image.float(), dim=-1)
    m = torch.full((image.shape[0], 1), float("-inf"), device=image.device)  # (B, 1) running max
    z = torch.zeros_like(m)  # (B, 1) running normaliser
    acc = torch.zeros_like(image)  # (B, D) running weighted sum
    for start in range(0, corpus.shape[0], chunk):
        s = F.normalize(corpus[start:start + chunk].float(), dim=-1)  # (c, D)
        logits = t * image @ s.T  # (B, c)
        m_new = torch.maximum(m, logits.max(dim=1, keepdim=True).values)  # (B, 1)
        w = (logits - m_new).exp()  # (B, c)
        scale = (m - m_new).exp()  # (B, 1)
        z = z * scale + w.sum(dim=1, keepdim=True)
        acc = acc * scale + w @ s
        m = m_new
    return acc / z  # (B, D)


def clip_agg_reward(target: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
    """r_agg = 0.5 * 100 * cos(a, t) + 0.5 * 100 * (1 - mean_d |a_d - t_d|). (B, D), (B, K, D) -> (B, K).

    Both a and t are L2-normalised first, so the L1 term compares directions, like the cosine
    (the aggregated target itself has norm < 1). Example: t == a gives 100.
    """
    a = F.normalize(target.float(), dim=-1)[:, None]  # (B, 1, D)
    c = F.normalize(caption.float(), dim=-1)  # (B, K, D)
    cos = (a * c).sum(-1)  # (B, K)
    l1 = (a - c).abs().mean(-1)  # (B, K)
    return 0.5 * 100 * cos + 0.5 * 100 * (1 - l1)


def semantic_reward(cos: torch.Tensor, agg: torch.Tensor, agg_weight: float) -> torch.Tensor:
    """r_sem = w * r_agg + (1 - w) * r_cos: w = 1 is CLIP-agg, w = 0 is CLIP-cos. (...) -> (...)."""
    return agg_weight * agg + (1 - agg_weight) * cos


# ----------------------------------------------------------------------------------------------
# Losses and the schedule (Sec. 3.4)


def scst_loss(logp: torch.Tensor, mask: torch.Tensor, reward: torch.Tensor,
              baseline: torch.Tensor | None = None) -> torch.Tensor:
    """Self-critical loss: -mean_{b,k} (r_bk - b_b) * mean_t log p(c_bkt). (B, K, T) ... -> scalar.

    baseline (B,) is the greedy caption's reward; None uses the leave-one-out mean of the other
    K - 1 samples. Log-probs are averaged over each caption's tokens (mask), as the paper does.
    Example: rewards [3, 1] with baseline 2 push sample 0 up and sample 1 down equally.
    """
    if baseline is None:
        k = reward.shape[1]
        baseline = (reward.sum(1, keepdim=True) - reward) / (k - 1)  # (B, K)
    else:
        baseline = baseline[:, None]  # (B, 1)
    advantage = (reward - baseline).detach()  # (B, K)
    mean_logp = (logp * mask).sum(-1) / mask.sum(-1).clamp_min(1)  # (B, K)
    return -(advantage * mean_logp).mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """BCE: corpus sentences are labelled 1, generated captions 0. (N,), (N',) -> (loss, stats)."""
    loss = 0.5 * (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                  + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
    acc = 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())
    return loss, {"d_loss": loss.item(), "d_acc": acc.item()}


def caption_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Text-only initialisation: cross-entropy over sentence tokens. (N, T, V), (N, T) -> scalar.

    Labels equal to IGNORE_INDEX (padding after the end token) do not count.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


def lambda_schedule(step: int, hold: int, ramp: int, final: float = 0.5) -> float:
    """lam(step): 0 for the first `hold` steps (naturalness only), then linear up to `final`.

    Example (hold=100, ramp=200, final=0.5): step 50 -> 0.0, step 200 -> 0.25, step 400 -> 0.5.
    """
    if step < hold:
        return 0.0
    if ramp <= 0:
        return final
    return final * min(1.0, (step - hold) / ramp)


# ----------------------------------------------------------------------------------------------
# Command line


def config_from_dict(d: dict) -> Config:
    """A Config from its asdict() form (config.json), refusing unknown keys."""
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return apply_overrides(Config(), flat)


def config_diff(a: dict, b: dict, prefix: str = "") -> tuple | None:
    """The first differing dotted key between two asdict() configs: (key, a_value, b_value) or None."""
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            found = config_diff(x, y, f"{prefix}{key}.")
            if found:
                return found
        elif x != y:
            return (prefix + key, x, y)
    return None


def _parse_sets(items: list[str] | None) -> dict[str, str]:
    """--set KEY=VALUE items as a dict of strings (typed later by apply_overrides)."""
    overrides = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set takes KEY=VALUE, not {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value.strip()
    return overrides


def _config_from_args(args) -> Config:
    cfg = Config()
    if args.preset:
        if args.preset not in PRESETS:
            raise ConfigError(f"unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
        apply_overrides(cfg, PRESETS[args.preset])
    apply_overrides(cfg, _parse_sets(args.set))
    if args.seed is not None:
        cfg.seed = args.seed
    if getattr(args, "reward", None):
        cfg.gan.reward = args.reward
    if args.name:
        cfg.name = args.name
    elif args.preset:
        reward = "" if cfg.gan.reward == "agg+gan" else f"_{cfg.gan.reward}"
        cfg.name = f"{args.preset}{reward}_seed{cfg.seed}"
    if cfg.gan.reward not in ("cos", "agg", "agg+gan", "gan"):
        raise ConfigError(f"gan.reward must be cos, agg, agg+gan or gan, not {cfg.gan.reward!r}")
    return cfg


def _run_config(run: str) -> tuple[Config, Path]:
    path = Path(run) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found; give the run folder of a trained run with --run")
    return config_from_dict(json.loads(path.read_text())), Path(run)


def _eval_config(args) -> tuple[Config, Path]:
    """The run's config with eval's target: --dataset (a preset dataset's split file and images)
    and --set overrides, e.g. real.eval_split_file / real.eval_image_root for any other split file."""
    cfg, run_dir = _run_config(args.run)
    overrides = dict(EVAL_DATASETS[args.dataset]) if args.dataset else {}
    overrides.update(_parse_sets(args.set))
    if cfg.data != "real" and any(k.startswith("real.") for k in overrides):
        raise ConfigError(f"--dataset and real.* settings score paper-scale runs (data=real); "
                          f"{run_dir} was trained on {cfg.data}")
    return apply_overrides(cfg, overrides), run_dir


def main(argv: list[str] | None = None) -> int:
    """`python cgtgan.py {train,init,eval,caption} ...`: the stages live in train.py."""
    import argparse

    parser = argparse.ArgumentParser(prog="cgtgan.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [("train", "text-only init + CgT-GAN + test table (default: ShapesWorld)"),
                       ("init", "text-only initialisation only"),
                       ("prepare", "paper scale: CLIP embeddings and CLIP-agg targets of a dataset")]:
        p = sub.add_parser(name, help=text)
        p.add_argument("--preset", help=f"paper-scale settings: {', '.join(PRESETS)}")
        p.add_argument("--seed", type=int)
        p.add_argument("--name", help="run folder name under runs/")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config field, e.g. --set gan.lr=1e-4 (repeatable)")
        p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
        if name == "train":
            p.add_argument("--reward", choices=["cos", "agg", "agg+gan", "gan"])
            p.add_argument("--ablation", action="store_true",
                           help="CLIP-cos, CLIP-agg and CLIP-agg + GAN from one initialisation")
    p = sub.add_parser("eval", help="metrics of a trained run on a split, of its own dataset or another")
    p.add_argument("--run", default="runs/shapesworld_seed0")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--checkpoint", default="best", choices=["best", "init"])
    p.add_argument("--dataset", choices=list(EVAL_DATASETS),
                   help="score on this dataset's Karpathy split (the presets' paths), e.g. ZS-IC")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a field of the run's config, e.g. --set real.eval_split_file=F "
                        "--set real.eval_image_root=DIR to score on any Karpathy split file")
    p = sub.add_parser("caption", help="caption image files with a trained run")
    p.add_argument("images", nargs="+")
    p.add_argument("--run", default="runs/shapesworld_seed0")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    import train
    from data import DataError

    try:
        if args.command in ("train", "init", "prepare"):
            cfg = _config_from_args(args)
            if args.command == "prepare":
                import realdata

                print(json.dumps(realdata.prepare(train.real_config(cfg)), indent=2))
            elif args.command == "init":
                train.run_init(cfg, resume=args.resume)
            elif args.ablation:
                train.run_ablation(cfg)
            else:
                train.run_train(cfg, resume=args.resume)
        elif args.command == "eval":
            cfg, run_dir = _eval_config(args)
            train.run_eval(cfg, run_dir, args.split, args.checkpoint)
        else:
            cfg, run_dir = _run_config(args.run)
            for path, caption in train.run_caption(cfg, run_dir, args.images):
                print(f"{path}: {caption}")
    except (ConfigError, DataError, train.TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # Run main from the importable module `cgtgan`, not from `__main__`: train.py imports
    # cgtgan, and its ConfigError must be the class main() catches.
    from cgtgan import main as cgtgan_main

    sys.exit(cgtgan_main())
