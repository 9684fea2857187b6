"""CgT-GAN: CLIP-guided Text GAN for image captioning -- the method.

Implements Yu et al., "CgT-GAN: CLIP-guided Text GAN for Image Captioning" (ACM MM 2023,
arXiv:2308.12045). Sec. 3.1: a frozen CLIP image embedding goes through a mapping network into P
"visual prompt" embeddings that prefix GPT-2 (the generator). Sec. 3.2: a RoBERTa discriminator
tells corpus sentences from generated captions and its logit is the naturalness reward. Sec. 3.3:
CLIP-cos and CLIP-agg rewards score the caption against the image. Sec. 3.4: self-critical policy
gradient with the greedy caption as baseline, lambda mixing semantic and naturalness rewards.

This file holds the paper's nouns (modules) and equations (small functions). The configs are in
config.py, the training step and loops in train.py, the run folder in runs.py, the commands in
cli.py, and the GPT-2 KV cache behind decoding in decoding.py.
`python cgtgan.py train` runs the ShapesWorld demo end to end (the command line is cli.py's).

Shape legend: B images, K samples per image, T tokens, P prefix tokens, D CLIP embedding width,
E GPT-2 width, H RoBERTa width, V vocabulary, M corpus sentences, N sequences (B*K or B).
"""
from __future__ import annotations

if __name__ == "__main__":
    # `python cgtgan.py ...` runs the command line, which imports this file as the module `cgtgan`
    # (so its classes are the ones the rest of the project uses). The guard comes before the heavy
    # imports below, so `python cgtgan.py --help` answers at once.
    import sys

    from cli import main

    sys.exit(main())

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import clip_tokenizer
import decoding
import retokenize
from config import ConfigError, DiscriminatorConfig, GeneratorConfig

# Labels at padding positions; cross-entropy skips them. Never 0: that is GPT-2's token "!".
IGNORE_INDEX = -1


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
    tokens[:, i] from the prefix and tokens[:, :i]. Decoding: `greedy` (the test-time caption and
    the self-critical baseline), `sample` (K captions per image with their log-probs, for training)
    and `beam_search` (an extra for evaluation).
    """

    def __init__(self, mapping: MappingNetwork, gpt, end_id: int, max_len: int = 20):
        super().__init__()
        self.mapping, self.gpt = mapping, gpt
        self.end_id, self.max_len = end_id, max_len

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return prefix_lm_logits(self.gpt, self.mapping(feats), tokens)  # (N, T, V)

    def log_probs(self, feats: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log p(tokens[:, i] | prefix, tokens[:, :i]) for every position: (N, T), with gradient."""
        return token_log_probs(self.forward(feats, tokens), tokens)

    @torch.no_grad()
    def greedy(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Argmax decoding. feats (B, D) -> (ids (B, T), mask (B, T)); mask is 1 up to the end token."""
        return self._decode(feats, uniforms=None)

    def sample(self, feats: torch.Tensor, k: int, uniforms: torch.Tensor | None = None,
               generator: torch.Generator | None = None):
        """K captions per image from the model's own distribution (temperature 1), Sec. 3.4.

        feats (B, D) -> ids (B, K, T), log-probs (B, K, T) WITH gradient, mask (B, K, T) float.
        Tokens are drawn under no_grad with a KV cache, then one teacher-forced pass over prefix +
        sampled tokens gives exactly the log-probs the sampler used, now differentiable.
        uniforms (B, K, max_len) in [0, 1) are the random numbers behind the draws (default: drawn
        from `generator`). A caption depends on its own numbers alone, not on when the other
        captions stop, so data-parallel processes that each take their rows of one global draw
        reproduce a single process exactly.
        """
        b = feats.shape[0]
        if uniforms is None:
            uniforms = torch.rand(b, k, self.max_len, generator=generator)
        feats_k = feats.repeat_interleave(k, dim=0)  # (B*K, D)
        ids, mask = self._decode(feats_k, uniforms.flatten(0, 1).to(feats.device))  # (B*K, T)
        logp = self.log_probs(feats_k, ids) * mask  # (B*K, T)
        shape = (b, k, ids.shape[1])
        return ids.view(shape), logp.view(shape), mask.view(shape)  # (B, K, T) each

    @torch.no_grad()
    def beam_search(self, feats: torch.Tensor, beams: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
        """Beam search (inference only) by length-normalised log-prob. feats (B, D) -> (ids, mask)."""
        return _pad([self._beam_search_one(f, beams) for f in feats], self.end_id, feats.device)

    @torch.no_grad()
    def _decode(self, feats: torch.Tensor, uniforms: torch.Tensor | None):
        """Autoregressive decoding with a KV cache. feats (N, D) -> (ids (N, T), mask (N, T)).

        Each step takes the argmax (uniforms None) or an exact draw from the softmax at the row's
        uniform number for that step (uniforms (N, max_len)). A row that emits the end token leaves
        the batch and its cache, so the model runs only on unfinished captions. The cache
        (decoding.kv_cache) is a lean GPT-2 step over the model's own weights when that is exact
        for this model: at ShapesWorld's size the per-call overhead of the full forward, not the
        FLOPs, dominates.
        """
        n = feats.shape[0]
        ids = torch.full((n, self.max_len), self.end_id, dtype=torch.long, device=feats.device)
        mask = torch.zeros(n, self.max_len, device=feats.device)
        rows = torch.arange(n, device=feats.device)  # (n',) rows still being decoded
        cache = decoding.kv_cache(self.gpt, self.max_len)
        logits = cache.start(self.mapping(feats))  # (N, V)
        for t in range(self.max_len):
            logits = logits.float()
            token = (logits.argmax(-1) if uniforms is None
                     else sample_categorical(logits, uniforms[rows, t]))  # (n',)
            ids[rows, t], mask[rows, t] = token, 1.0
            # One host sync per token: the running rows' indices tell both whether any row runs
            # and whether some stopped.
            index = (token != self.end_id).nonzero().squeeze(1)  # (n'',)
            if index.numel() == 0:
                break
            if index.numel() < token.numel():
                cache.keep(index)
                rows, token = rows[index], token[index]
            logits = cache.step(token)  # (n', V)
        return ids[:, :t + 1], mask[:, :t + 1]  # (N, T), (N, T)

    def _beam_search_one(self, feats: torch.Tensor, beams: int) -> list[int]:
        """The best caption of one image (D,): beams kept by summed log-prob, finished captions
        ranked by log-prob per token. Beams still open at max_len count as captions cut there;
        beams left open when the search stops early are prefixes and do not."""
        seqs, scores, done = [[]], torch.zeros(1), []
        for _ in range(self.max_len):
            tokens = torch.tensor(seqs, dtype=torch.long, device=feats.device).view(len(seqs), -1)
            embeds = torch.cat([self.mapping(feats.expand(len(seqs), -1)),
                                self.gpt.transformer.wte(tokens)], 1)  # (b, P+t, E)
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
        else:
            # max_len reached: the open beams are captions cut at the length limit.
            done += [(s / len(q), q) for s, q in zip(scores.tolist(), seqs)]
        return max(done)[1]


# exercise: prefix_lm_logits (docs/exercises.md)
def prefix_lm_logits(gpt, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher forcing through a visual prefix (Sec. 3.1): GPT-2 reads the P prefix embeddings
    (N, P, E) and then the T caption tokens (N, T) -> logits (N, T, V), where logits[:, i]
    predicts tokens[:, i] from the prefix and tokens[:, :i] alone.

    GPT-2's output at a position predicts the token after it, so the P+T outputs shift by one:
    the output at position P-1+i (the last prefix vector for i = 0, then each word) predicts word
    i. The first P-1 outputs predict prefix vectors, which are no tokens, and the last output
    predicts what would follow the caption: neither has a label, and both are dropped.
    Worked example, P = 2, T = 3: GPT-2 reads [p0, p1, w0, w1, w2] and outputs rows 0..4;
    row 1 (after p1) predicts w0, row 2 predicts w1, row 3 predicts w2; rows 0 and 4 are dropped.
    """
    embeds = torch.cat([prefix, gpt.transformer.wte(tokens)], dim=1)  # (N, P+T, E)
    logits = gpt(inputs_embeds=embeds).logits  # (N, P+T, V)
    return logits[:, prefix.shape[1] - 1:-1]  # (N, T, V)


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
    """Sec. 3.2: transformers' RobertaModel (submodule `roberta`) + an MLP head with tanh.

    head "cls" (ours): H -> H -> 1 on the <s> token's last hidden state. head "pooler" (the
    official code's): RoBERTa's pooler (dense + tanh on <s>, pretrained with the model), then
    H -> H/2 -> 1 (768 -> 384 -> 1 for RoBERTa-base).
    forward(input_ids (N, T), attention_mask (N, T)) -> logits (N,): > 0 means "real sentence".
    """

    def __init__(self, roberta, head: str = "cls"):
        super().__init__()
        self.roberta, self.pooled = roberta, head == "pooler"
        width = roberta.config.hidden_size
        hidden = width // 2 if self.pooled else width
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.roberta(input_ids=input_ids, attention_mask=attention_mask)
        state = out.pooler_output if self.pooled else out.last_hidden_state[:, 0]  # (N, H)
        return self.head(state).squeeze(-1)  # (N,)


def roberta_inputs(tokenizer, texts: list[str], max_tokens: int = 0,
                   known: list[list[int] | None] | None = None):
    """RoBERTa token ids (N, T) of texts, <s> ... </s>, right-padded with the tokenizer's pad id,
    and their attention mask (N, T). max_tokens > 0 cuts a longer text to max_tokens tokens, the
    last two "." and </s>, as the official code cuts the discriminator's inputs at 22.
    Example (max_tokens 5): <s> a b c d </s> -> <s> a b . </s>.

    known (N,): rows already known to be tokenizer(text)["input_ids"] (retokenize.mapped_rows
    looks them up from the generator's ids), None where the text must be tokenised; the result is
    the same, with less host work.
    """
    rows = list(known) if known is not None else [None] * len(texts)
    todo = [i for i, r in enumerate(rows) if r is None]
    if todo:
        for i, r in zip(todo, tokenizer([texts[i] for i in todo])["input_ids"]):
            rows[i] = r
    if max_tokens:
        (dot,) = tokenizer.encode(".", add_special_tokens=False)
        rows = [r if len(r) <= max_tokens else r[:max_tokens - 2] + [dot, r[-1]] for r in rows]
    # The ids go into one tensor at once: a copy per row would cost more than the tokenizer.
    lengths = torch.tensor([len(r) for r in rows])  # (N,)
    mask = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).long()  # (N, T)
    ids = torch.full(mask.shape, tokenizer.pad_token_id, dtype=torch.long)  # (N, T)
    ids[mask.bool()] = torch.tensor([i for r in rows for i in r], dtype=torch.long)
    return ids, mask  # (N, T), (N, T)


# ----------------------------------------------------------------------------------------------
# Building the models: small ones from a tokenizer's vocabulary, or released weights by directory


def _from_pretrained(cls, name: str, what: str, download: str, **config):
    """cls.from_pretrained(name), or a one-line ConfigError that says how to download it."""
    try:
        return cls.from_pretrained(name, **config)
    except (OSError, ValueError) as err:
        reason = type(err).__name__
        if Path(name).is_dir() and not any(Path(name).glob("*.safetensors")) and \
                not any(Path(name).glob("*.bin")) and "tokenizer" not in what:
            reason = "the folder holds no weights: no model.safetensors or pytorch_model.bin"
        raise ConfigError(f"{what} not found at {name!r} ({reason}); download it with "
                          f"`hf download {download} --local-dir {name}` and pass that "
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


# Positions of a small model built from scratch: the small GPT-2 sees the prefix, the caption and a
# few spare positions; the small RoBERTa sees up to 64 tokens plus <s> and </s> (RoBERTa counts
# positions from pad_token_id + 1, so two more are reserved).
GPT2_SPARE_POSITIONS = 4
ROBERTA_MAX_TOKENS = 64


def build_generator(cfg: GeneratorConfig, tokenizer, clip_dim: int) -> CaptionGenerator:
    """CaptionGenerator for CLIP width D = clip_dim: released GPT-2 weights or a fresh small model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if cfg.pretrained:
        # Dropout set at loading: the modules take p from the config when they are built.
        drop = {"resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout}
        gpt = _from_pretrained(GPT2LMHeadModel, cfg.pretrained, "GPT-2", "gpt2", **drop)
    else:
        gpt = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tokenizer), n_positions=cfg.prefix_len + cfg.max_len + GPT2_SPARE_POSITIONS,
            n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id))
    mapping = MappingNetwork(clip_dim, gpt.config.n_embd, cfg.prefix_len, cfg.mapping_hidden)
    return CaptionGenerator(mapping, gpt, end_token_id(tokenizer, cfg.end_token), cfg.max_len)


def build_discriminator(cfg: DiscriminatorConfig, tokenizer) -> Discriminator:
    """Discriminator over released RoBERTa weights or a fresh small RoBERTa, with cfg.head."""
    from transformers import RobertaConfig, RobertaModel

    if cfg.pretrained:
        # Dropout set at loading, as for GPT-2: the modules take p from the config when built.
        drop = {"hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout}
        roberta = _from_pretrained(RobertaModel, cfg.pretrained, "RoBERTa", "roberta-base", **drop)
        # The released weights include a pooler, which the head on <s> does not use; dropped (as
        # add_pooling_layer=False does), so that no parameter goes without a gradient.
        if cfg.head == "cls":
            roberta.pooler = None
    else:
        roberta = RobertaModel(RobertaConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.hidden, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, intermediate_size=4 * cfg.hidden,
            max_position_embeddings=ROBERTA_MAX_TOKENS + 2, type_vocab_size=1, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout),
            add_pooling_layer=cfg.head == "pooler")
    return Discriminator(roberta, cfg.head)


# ----------------------------------------------------------------------------------------------
# Captions as text: token ids to strings and back, and through CLIP's text tower


def decode_captions(tokenizer, ids: torch.Tensor, mask: torch.Tensor, end_id: int) -> list[str]:
    """Token ids (N, T) with mask (N, T) -> caption strings, without the end token.

    The tokenizer's text as it is: no clean-up of spaces before punctuation (transformers 4.x
    did that by default, 5.x does not), so " ," and " ." stay as the corpus writes them. Byte-level
    tokens are joined as bytes (retokenize.decode_row), the same text faster than the tokenizer.
    """
    out = []
    for row, n in zip(ids.tolist(), mask.sum(-1).long().tolist()):
        row = row[:n]
        if row and row[-1] == end_id:
            row = row[:-1]
        out.append(" ".join(retokenize.decode_row(tokenizer, row).split()))
    return out


def encode_sentences(tokenizer, sentences: list[str], end_id: int, max_len: int):
    """Corpus sentences -> token ids (M, T) padded with end_id and labels (M, T) with IGNORE_INDEX.

    Each sentence is cut to max_len - 1 tokens and ends with end_id, as the generator's captions do.
    """
    rows = [ids[:max_len - 1] + [end_id] for ids in
            tokenizer(sentences, add_special_tokens=False)["input_ids"]]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), end_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = labels[i, :len(r)] = torch.tensor(r)
    return ids, labels  # (M, T), (M, T)


class ClipText:
    """E_T of Sec. 3.3: CLIP text embeddings (N, D) of caption strings, L2-normalised (or raw, as
    CLIP's text tower gives them, with normalize=False: the official L1 term compares those).

    Memoised by string, because sampled captions repeat often and the text tower is the costliest
    reward term; the memo is bounded (max_cache strings) and emptied when it would overflow.
    """

    def __init__(self, clip, tokenizer, device, max_cache: int = 200_000, normalize: bool = True):
        self.clip, self.tokenizer, self.device, self.max_cache = clip, tokenizer, device, max_cache
        self.normalize = normalize
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        unique = set(texts)
        # Emptied before the lookup, never between it and the encoding: every string of this
        # call is then either still cached or encoded now.
        if len(self.cache) + len(unique - self.cache.keys()) > self.max_cache:
            self.cache.clear()
        todo = sorted(unique - self.cache.keys())
        if todo:
            tokens = clip_tokenizer.tokenize(todo, self.clip.config.context_length, truncate=True,
                                             tokenizer=self.tokenizer).to(self.device)  # (n, L)
            emb = self.clip.encode_text(tokens).float()  # (n, D)
            emb = (F.normalize(emb, dim=-1) if self.normalize else emb).cpu()
            self.cache.update(zip(todo, emb))
        return torch.stack([self.cache[t] for t in texts]).to(self.device)  # (N, D)


# ----------------------------------------------------------------------------------------------
# Rewards (Sec. 3.2-3.3): small pure functions


def naturalness_reward(logits: torch.Tensor) -> torch.Tensor:
    """r_nat = D(c), the discriminator's logit for caption c. (...) -> (...), no gradient.

    The logit (not sigmoid) keeps a useful signal when the discriminator is confident: sigmoid
    saturates at 0 for obviously fake captions, giving every sample the same reward.
    Example: logits [2.0, -1.0] -> rewards [2.0, -1.0].
    """
    return logits.detach().float()


# exercise: clip_cos_reward (docs/exercises.md)
def clip_cos_reward(image: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
    """r_cos = 100 * cos(v, t): image embeddings (B, D), caption embeddings (B, K, D) -> (B, K).

    Example: identical directions give 100, orthogonal ones 0.
    """
    return 100 * torch.einsum("bd,bkd->bk", F.normalize(image.float(), dim=-1),
                              F.normalize(caption.float(), dim=-1))


# exercise: clip_agg_target (docs/exercises.md)
@torch.no_grad()
def clip_agg_target(image, corpus, t: float, image_chunk: int = 2048, corpus_chunk: int = 16384,
                    progress: bool = False, raw: bool = False) -> torch.Tensor:
    """Sec. 3.3, the CLIP-agg target: a_i = sum_j softmax_j(t * cos(v_i, s_j)) * s_j over the corpus.

    image (N, D) and corpus (M, D) are anything sliceable by rows (tensors, numpy arrays, memory
    maps, realdata's sharded caches), any float dtype. The cosines compare L2-normalised rows;
    the sum takes the corpus rows normalised too, or with raw=True as given (the official code
    sums raw CLIP text embeddings). Returns (N, D) float32 on the image's device (not normalised,
    like the equation).

    The N x M matrix of weights never exists: the corpus is read once, chunk by chunk (outer
    loop), and for each chunk the images are visited in chunks (inner loop), each image's softmax
    accumulated online: a running maximum m_i, a running normaliser z_i = sum_j exp(t*cos_ij - m_i)
    and a running weighted sum a_i, both rescaled by exp(m_old - m_new) whenever the maximum grows,
    so no exp overflows. Memory is 4*N*(D + 2) bytes of state plus one (image_chunk, corpus_chunk)
    tile, whatever M is (bench/bench_prepare.py measures it: about 0.6 GB for COCO with ViT-L/14).

    Worked example: corpus s_1 = e_1, s_2 = e_2, t = 100 and an image v = e_1: the weights are
    softmax(100, 0) = (1 - 3.7e-44, 3.7e-44), so a = e_1: the nearest sentence dominates. For
    v = (1, 1) both cosines are 0.71, the weights 1/2 each, and a = (0.5, 0.5).
    """
    image = _as_tensor(image)
    n, d = image.shape
    if corpus.shape[1] != d or corpus.shape[0] == 0:
        raise ValueError(f"CLIP-agg: the corpus is {tuple(corpus.shape)}; it must be non-empty "
                         f"and {d} wide like the image embeddings")
    run_max = torch.full((n,), float("-inf"), device=image.device)  # (N,)
    norm = torch.zeros(n, device=image.device)  # (N,)
    agg = torch.zeros(n, d, device=image.device)  # (N, D)
    for j0 in tqdm(range(0, corpus.shape[0], corpus_chunk), desc="CLIP-agg targets",
                   unit="chunk", disable=not progress):
        rows = corpus[j0:j0 + corpus_chunk]
        sents = _unit_rows(rows, image.device)  # (bj, D)
        values = _as_tensor(rows).to(image.device, torch.float32) if raw else sents  # (bj, D)
        for i0 in range(0, n, image_chunk):
            i1 = min(i0 + image_chunk, n)
            logits = t * _unit_rows(image[i0:i1], image.device) @ sents.T  # (bi, bj)
            new_max = torch.maximum(run_max[i0:i1], logits.max(dim=1).values)  # (bi,)
            rescale = torch.exp(run_max[i0:i1] - new_max)  # (bi,), 0 on the first chunk
            weights = logits.sub_(new_max[:, None]).exp_()  # (bi, bj), in place: one tile alive
            norm[i0:i1] = norm[i0:i1] * rescale + weights.sum(dim=1)
            agg[i0:i1] = agg[i0:i1] * rescale[:, None] + weights @ values  # (bi, D)
            run_max[i0:i1] = new_max
    return agg / norm[:, None]  # (N, D)


def _as_tensor(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def _unit_rows(x, device: torch.device) -> torch.Tensor:
    """Rows of an array-like as L2-normalised float32 on device (a copy, never the caller's)."""
    x = _as_tensor(x).to(device=device, dtype=torch.float32, copy=True)
    return x.div_(x.norm(dim=1, keepdim=True).clamp_min(1e-12))


# exercise: clip_agg_reward (docs/exercises.md)
def clip_agg_reward(target: torch.Tensor, caption: torch.Tensor, raw: bool = False) -> torch.Tensor:
    """r_agg = 0.5 * 100 * cos(a, t) + 0.5 * 100 * (1 - mean_d |a_d - t_d|). (B, D), (B, K, D) -> (B, K).

    By default a and t are L2-normalised first, so the L1 term compares directions, like the
    cosine (the aggregated target itself has norm < 1). raw=True takes them as given, as the
    official code does: its L1 term compares the raw target with the raw caption embedding.
    Example: t == a gives 100.
    """
    if raw:
        a, c = target.float()[:, None], caption.float()  # (B, 1, D), (B, K, D)
        cos = F.cosine_similarity(a, c, dim=-1)  # (B, K)
    else:
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


# exercise: caption_log_prob (docs/exercises.md)
def caption_log_prob(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The log-probability of each sampled caption, per token: the mean of its token log-probs
    over its real tokens. logp, mask (..., T) -> (...); mask is 1 up to and including the end
    token, 0 on the padding after it (whose log-probs, whatever they hold, must not count).

    The paper averages over the caption's own length, so a long caption is not pushed harder
    than a short one with the same advantage. A caption with no real token (never sampled) gets 0.
    Worked example: logp (-1, -3, -50), mask (1, 1, 0) -> (-1 - 3) / 2 = -2.
    """
    return (logp * mask).sum(-1) / mask.sum(-1).clamp_min(1)  # (...)


# exercise: scst_loss (docs/exercises.md)
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
    return -(advantage * caption_log_prob(logp, mask)).mean()


# exercise: generator_loss (docs/exercises.md)
def generator_loss(logp: torch.Tensor, mask: torch.Tensor, r_sem: torch.Tensor,
                   r_nat: torch.Tensor, lam: float, baseline: str = "greedy") -> tuple[torch.Tensor, dict]:
    """Sec. 3.4, the generator's loss: L_G = lam * L_sem + (1 - lam) * L_nat, each term a
    self-critical loss with its own baseline. logp, mask (B, K, T); r_sem, r_nat (B, K+1): the K
    samples' rewards, then the greedy caption's at index K -> (L_G, {"loss_sem", "loss_nat"}).

    baseline "greedy": each reward's own greedy caption's reward (r_sem[:, K] for L_sem,
    r_nat[:, K] for L_nat: a CLIP reward near 100 and a discriminator logit near 0 are on scales
    no shared baseline fits); "loo": the mean of the other samples' rewards (the greedy column
    unused). lam = 0 is naturalness alone (lambda_schedule holds it there first).
    Worked example (B = 1, K = 2, mean log-probs (-1, -2), lam = 0.25): r_sem (60, 40, 50) gives
    advantages (10, -10) and L_sem = -(10 * -1 - 10 * -2) / 2 = -5; r_nat (1, 3, 2) gives (-1, 1)
    and L_nat = -(-1 * -1 + 1 * -2) / 2 = 0.5; L_G = 0.25 * -5 + 0.75 * 0.5 = -0.875.
    """
    k = logp.shape[1]
    loo = baseline == "loo"
    loss_sem = scst_loss(logp, mask, r_sem[:, :k], None if loo else r_sem[:, k])
    loss_nat = scst_loss(logp, mask, r_nat[:, :k], None if loo else r_nat[:, k])
    loss = lam * loss_sem + (1 - lam) * loss_nat
    return loss, {"loss_sem": loss_sem.item(), "loss_nat": loss_nat.item()}


# exercise: discriminator_loss (docs/exercises.md)
def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """BCE: corpus sentences are labelled 1, generated captions 0. (N,), (N',) -> (loss, stats)."""
    loss = 0.5 * (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                  + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
    acc = 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())
    return loss, {"d_loss": loss.item(), "d_acc": acc.item()}


# exercise: caption_loss (docs/exercises.md)
def caption_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Text-only initialisation: cross-entropy over sentence tokens. (N, T, V), (N, T) -> scalar.

    labels[n, t] is the target of logits[n, t] as they stand: CaptionGenerator.forward already
    returns, at position t, the prediction of token t (made from the prefix and tokens < t), so
    no second shift happens here. Labels equal to IGNORE_INDEX (padding after the end token) do
    not count.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


# exercise: lambda_schedule (docs/exercises.md)
def lambda_schedule(step: int, hold: int, ramp: int, final: float = 0.5) -> float:
    """lam(step): 0 for the first `hold` steps (naturalness only), then linear up to `final`.

    Example (hold=100, ramp=200, final=0.5): step 50 -> 0.0, step 200 -> 0.25, step 400 -> 0.5.
    """
    if step < hold:
        return 0.0
    if ramp <= 0:
        return final
    return final * min(1.0, (step - hold) / ramp)


