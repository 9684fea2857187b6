"""CgT-GAN's training stages and evaluation (the loops behind `python cgtgan.py`).

Follows Sec. 3.4 of CgT-GAN (arXiv:2308.12045): text-only initialisation of the generator on the
corpus, then adversarial self-critical training on unpaired images, one discriminator step per
generator step, lambda ramping from 0 to 0.5. The equations live in cgtgan.py; this file moves data
through them and evaluates. What a run leaves on disk (config.json, checkpoints, metrics.jsonl,
resume) is runs.py; figures.py draws samples.png and curves.png.

Shape legend: B images, K samples per image, T tokens, D CLIP width, M corpus sentences.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import figures
import runs
from cgtgan import (IGNORE_INDEX, Config, ConfigError, build_discriminator, build_generator,
                    caption_loss, clip_agg_reward, clip_agg_target, clip_cos_reward,
                    discriminator_loss, lambda_schedule, load_tokenizer, naturalness_reward,
                    scst_loss, semantic_reward, token_log_probs)


class TrainingError(RuntimeError):
    """A run that must stop (NaN loss): the message names the step, the term and the checkpoint."""


def check_finite(step: int, stage: str, terms: dict, checkpoint: Path) -> None:
    """Stop with a one-line message when a loss or reward term is NaN or infinite."""
    for name, value in terms.items():
        if not math.isfinite(float(value)):
            raise TrainingError(f"{stage} step {step}: {name} is {value}; stopped, the last good "
                                f"checkpoint is kept at {checkpoint}")


# ----------------------------------------------------------------------------------------------
# Text through CLIP, captions through tokenizers


class ClipText:
    """CLIP text embeddings (N, D), L2-normalised, of caption strings; memoised by string because
    sampled captions repeat often and the text tower is the costliest reward term."""

    def __init__(self, clip, tokenizer, device, max_cache: int = 200_000):
        self.clip, self.tokenizer, self.device, self.max_cache = clip, tokenizer, device, max_cache
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        from clip_tokenizer import tokenize

        todo = sorted({t for t in texts if t not in self.cache})
        if todo:
            if len(self.cache) + len(todo) > self.max_cache:
                self.cache.clear()
            tokens = tokenize(todo, context_length=self.clip.config.context_length, truncate=True,
                              tokenizer=self.tokenizer).to(self.device)  # (n, L)
            emb = F.normalize(self.clip.encode_text(tokens).float(), dim=-1).cpu()  # (n, D)
            self.cache.update(zip(todo, emb))
        return torch.stack([self.cache[t] for t in texts]).to(self.device)  # (N, D)


def decode_captions(tokenizer, ids: torch.Tensor, mask: torch.Tensor, end_id: int) -> list[str]:
    """Token ids (N, T) with mask (N, T) -> caption strings, without the end token."""
    out = []
    for row, n in zip(ids.tolist(), mask.sum(-1).long().tolist()):
        row = row[:n]
        if row and row[-1] == end_id:
            row = row[:-1]
        out.append(" ".join(tokenizer.decode(row).split()))
    return out


def encode_sentences(tokenizer, sentences: list[str], end_id: int, max_len: int):
    """Corpus sentences -> token ids (M, T) padded with end_id and labels (M, T) with IGNORE_INDEX."""
    rows = [ids[:max_len - 1] + [end_id] for ids in
            tokenizer(sentences, add_special_tokens=False)["input_ids"]]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), end_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = labels[i, :len(r)] = torch.tensor(r)
    return ids, labels  # (M, T), (M, T)


# ----------------------------------------------------------------------------------------------
# Everything a stage needs


@dataclass
class Parts:
    cfg: Config
    data: object  # data.CaptionData
    device: torch.device
    gen: object  # cgtgan.CaptionGenerator
    gen_tok: object
    disc: object  # cgtgan.Discriminator
    disc_tok: object
    clip_text: ClipText | None
    rank: int = 0  # data-parallel rank (torchrun); 0 alone writes files and evaluates
    world: int = 1
    gen_train: object = None  # the modules that carry gradients: DDP wrappers under torchrun
    disc_train: object = None

    @functools.cached_property
    def data_fingerprint(self) -> str:
        """runs.data_fingerprint of this run's data, computed once; stored in every checkpoint."""
        return runs.data_fingerprint(self.data)

    def autocast(self):
        if self.cfg.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def rows(self, n: int) -> tuple[int, int]:
        """This rank's slice [lo, hi) of a global batch of n rows."""
        if n % self.world:
            raise ConfigError(f"batch {n} does not split evenly over {self.world} processes")
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def mean(self, values: dict) -> dict:
        """Numeric stats averaged over ranks (identity in one process)."""
        if self.world == 1:
            return values
        keys = [k for k, v in values.items() if isinstance(v, (int, float))]
        t = torch.tensor([float(values[k]) for k in keys], device=self.device)
        torch.distributed.all_reduce(t)
        return {**values, **dict(zip(keys, (t / self.world).tolist()))}


def pick_device(name: str) -> torch.device:
    """"auto" is CUDA when present (under torchrun: the GPU of this LOCAL_RANK), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def init_distributed(cfg: Config) -> bool:
    """Join the torchrun process group when launched with WORLD_SIZE > 1 (NCCL on GPUs, else gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or torch.distributed.is_initialized():
        return False
    device = pick_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def _dataclass_with(cls, overrides: dict, prefix: str):
    """cls() with overrides checked against its fields (strings parsed to the field's type)."""
    from cgtgan import _parse_value

    obj = cls()
    for key, value in overrides.items():
        if key not in cls.__dataclass_fields__:
            raise ConfigError(f"unknown config key '{prefix}.{key}'; valid: "
                              + ", ".join(f"{prefix}.{k}" for k in cls.__dataclass_fields__))
        kind = type(getattr(obj, key))
        if isinstance(value, str) and kind in (int, float, bool):
            value = _parse_value(f"{prefix}.{key}", value, kind)
        setattr(obj, key, value)
    return obj


def load_data(cfg: Config):
    """The CaptionData named by cfg.data: ShapesWorld (built or reused), or a prepared real dataset."""
    if cfg.data == "shapesworld":
        from shapesworld import ShapesWorldConfig, build_shapesworld

        return build_shapesworld(_dataclass_with(ShapesWorldConfig, cfg.world, "world")).validate()
    if cfg.data == "real":
        import realdata

        return realdata.load_real_data(real_config(cfg))
    raise ConfigError(f"data must be shapesworld or real, not {cfg.data!r}")


def real_config(cfg: Config):
    """realdata.RealDataConfig from cfg.real (the paper-scale dataset's files and cleaning)."""
    import realdata

    real = _dataclass_with(realdata.RealDataConfig, cfg.real, "real")
    real.device = cfg.device
    return real


def build_parts(cfg: Config, data, with_clip: bool = True) -> Parts:
    """Tokenizers, generator, discriminator and CLIP text tower for this config and dataset."""
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    gen_tok = load_tokenizer(cfg.gen.pretrained or data.gpt2_path, "GPT-2")
    disc_tok = load_tokenizer(cfg.disc.pretrained or data.roberta_path, "RoBERTa")
    torch.manual_seed(cfg.seed)
    # A model directory in the data (paper scale) is loaded; a tokenizer-only one (ShapesWorld)
    # means a small model trained from scratch.
    gen_cfg, disc_cfg = cfg.gen, cfg.disc
    if not gen_cfg.pretrained and (Path(data.gpt2_path) / "config.json").is_file():
        gen_cfg = replace(gen_cfg, pretrained=str(data.gpt2_path))
    if not disc_cfg.pretrained and (Path(data.roberta_path) / "config.json").is_file():
        disc_cfg = replace(disc_cfg, pretrained=str(data.roberta_path))
    gen = build_generator(gen_cfg, gen_tok, data.train_feats.shape[1]).to(device)
    disc = build_discriminator(disc_cfg, disc_tok).to(device)
    rank, world, gen_train, disc_train = 0, 1, gen, disc
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from torch.nn.parallel import DistributedDataParallel as DDP

        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        ids = [device.index] if device.type == "cuda" else None
        gen_train, disc_train = DDP(gen, device_ids=ids), DDP(disc, device_ids=ids)
    clip_text = None
    if with_clip:
        import clip_model
        import clip_tokenizer

        clip, _ = clip_model.load(str(data.clip_path), device=device)
        bpe = str(data.clip_bpe_path) if data.clip_bpe_path else None
        clip_text = ClipText(clip, clip_tokenizer.Tokenizer(bpe), device)
    return Parts(cfg, data, device, gen, gen_tok, disc, disc_tok, clip_text, rank, world,
                 gen_train, disc_train)


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def caption_feats(parts: Parts, feats: torch.Tensor, batch: int = 256) -> list[str]:
    """Captions for CLIP image embeddings (n, D): greedy, or beam search when cfg.decode == "beam"."""
    parts.gen.eval()
    out = []
    for start in range(0, feats.shape[0], batch):
        f = feats[start:start + batch].to(parts.device)
        with parts.autocast():
            ids, mask = (parts.gen.beam_search(f) if parts.cfg.decode == "beam"
                         else parts.gen.greedy(f))
        out += decode_captions(parts.gen_tok, ids, mask, parts.gen.end_id)
    parts.gen.train()
    return out


def score_captions(data, split: str, ids: list[str], captions: list[str]) -> dict:
    """CIDEr-D, BLEU-4, ROUGE-L (x100), fluency and faithfulness (x100), mean length in words."""
    from evaluate import score

    cands = dict(zip(ids, captions))
    refs = {i: data.splits[split].references[i] for i in ids}
    s = score(cands, refs)
    out = {k: 100 * s[k] for k in ("CIDEr-D", "BLEU-4", "ROUGE-L")}
    checked = data.check(cands, split)
    if checked:
        out.update({k: 100 * checked[k] for k in ("fluency", "faithfulness")})
    out["length"] = sum(len(c.split()) for c in captions) / max(1, len(captions))
    return out


def evaluate_generator(parts: Parts, split: str, limit: int = 0) -> tuple[dict, list[str]]:
    es = parts.data.splits[split]
    n = limit or len(es.ids)
    captions = caption_feats(parts, es.feats[:n])
    return score_captions(parts.data, split, es.ids[:n], captions), captions


def retrieval_captions(data, feats: torch.Tensor, chunk: int = 8192) -> list[str]:
    """CLIPRe-like baseline: the corpus sentence whose CLIP text embedding is nearest each image."""
    best = torch.full((feats.shape[0],), -2.0)
    arg = torch.zeros(feats.shape[0], dtype=torch.long)
    for start in range(0, data.corpus_feats.shape[0], chunk):
        sims = feats @ data.corpus_feats[start:start + chunk].T  # (n, c)
        value, index = sims.max(1)
        better = value > best
        best[better], arg[better] = value[better], index[better] + start
    return [data.corpus[i] for i in arg.tolist()]


# ----------------------------------------------------------------------------------------------
# Stage 1: text-only initialisation


def init_step(parts: Parts, opt, feats: torch.Tensor, tokens: torch.Tensor, target: torch.Tensor,
              step: int, checkpoint: Path) -> float:
    """One text-only step: caption cross-entropy of tokens (B, T) from feats (B, D) against target
    (B, T), stopped if not finite (naming step and checkpoint), then AdamW with clipping at 1.0."""
    with parts.autocast():
        loss = caption_loss(parts.gen_train(feats, tokens), target)
    check_finite(step, "init", {"caption_loss": loss.item()}, checkpoint)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parts.gen.parameters(), 1.0)
    opt.step()
    return loss.item()


def train_init(parts: Parts, run_dir: Path, log, stop_after: int | None = None) -> None:
    """Train mapping network + GPT-2 to rebuild each corpus sentence from its CLIP text embedding."""
    cfg, data, gen = parts.cfg.init, parts.data, parts.gen
    ids, labels = encode_sentences(parts.gen_tok, data.corpus, gen.end_id, gen.max_len)
    opt = torch.optim.AdamW(gen.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(parts.cfg.seed)
    start = 0
    if (run_dir / "init_last.pt").is_file():
        blob = runs.load_checkpoint(run_dir / "init_last.pt", parts, same_data=True)
        opt.load_state_dict(blob["opt_g"])
        runs.set_rng_state(blob["rng"], g)
        start = blob["step"]
    gen.train()
    bar = tqdm(range(start, cfg.steps), desc="text-only init", initial=start, total=cfg.steps,
               dynamic_ncols=True, leave=False)
    for step in bar:
        idx = torch.randint(len(data.corpus), (cfg.batch,), generator=g)
        feats = data.corpus_feats[idx]  # (B, D)
        if cfg.noise > 0:
            feats = F.normalize(feats + cfg.noise * torch.randn(feats.shape, generator=g), dim=-1)
        lo, hi = parts.rows(cfg.batch)
        idx, feats = idx[lo:hi], feats[lo:hi]  # this rank's sentences
        width = int((labels[idx] != IGNORE_INDEX).sum(1).max())
        tokens, target = ids[idx, :width].to(parts.device), labels[idx, :width].to(parts.device)
        loss = init_step(parts, opt, feats.to(parts.device), tokens, target, step + 1,
                         run_dir / "init_last.pt")
        log(parts.mean({"stage": "init", "step": step + 1, "loss": loss}))
        bar.set_postfix(loss=f"{loss:.3f}")
        done = step + 1 == cfg.steps
        if done or (step + 1) % 500 == 0 or (stop_after and step + 1 == stop_after):
            runs.save_checkpoint(run_dir / "init_last.pt", parts, opt_g=opt.state_dict(),
                                 rng=runs.rng_state(g), step=step + 1, stage="init")
        if stop_after and step + 1 == stop_after and not done:
            return
    bar.close()
    runs.save_checkpoint(run_dir / "init.pt", parts, step=cfg.steps, stage="init")
    if parts.rank == 0:
        (run_dir / "init_last.pt").unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Stage 2: CgT-GAN


def gan_step(parts: Parts, opt_g, opt_d, feats: torch.Tensor, targets: torch.Tensor, step: int,
             g: torch.Generator) -> tuple[dict, dict]:
    """One generator step and one discriminator step on a global batch of B images.

    Every rank draws the random numbers of the whole batch from the same generator and keeps its
    own rows, so data-parallel ranks reproduce one process. Returns (losses, stats).
    """
    cfg, gen, disc = parts.cfg.gan, parts.gen, parts.disc
    use_gan, use_sem = "gan" in cfg.reward, cfg.reward != "gan"
    K = cfg.k
    uniforms = torch.rand(feats.shape[0] * K, gen.max_len, generator=g)  # (B*K, T) global
    real_idx = torch.randint(len(parts.data.corpus), (feats.shape[0] * K,), generator=g)
    lo, hi = parts.rows(feats.shape[0])
    feats, targets = feats[lo:hi], targets[lo:hi]  # this rank's images
    uniforms, real_idx = uniforms[lo * K:hi * K], real_idx[lo * K:hi * K]
    B = feats.shape[0]
    timing, t0 = {}, time.perf_counter()
    rep = feats.repeat_interleave(K, dim=0)  # (B*K, D)
    # K samples per image and, in the same batch, each image's greedy caption (the baseline).
    greedy_rows = torch.arange(B * K + B) >= B * K  # (B*K + B,)
    with parts.autocast():
        ids, masks = gen.draw(torch.cat([rep, feats]), greedy_rows=greedy_rows,
                              uniforms=torch.cat([uniforms, torch.zeros(B, gen.max_len)]))
    flat_ids, flat_mask = ids[:B * K], masks[:B * K]  # (B*K, T)
    g_ids, g_mask = ids[B * K:], masks[B * K:]  # (B, T)
    captions = decode_captions(parts.gen_tok, flat_ids, flat_mask, gen.end_id)  # B*K
    greedy = decode_captions(parts.gen_tok, g_ids, g_mask, gen.end_id)  # B
    timing["sample"], t0 = time.perf_counter() - t0, time.perf_counter()

    # The semantic reward: CLIP-cos against the image, CLIP-agg against its corpus aggregate.
    emb = parts.clip_text(captions + greedy)  # (B*K + B, D)
    emb = torch.cat([emb[:B * K].view(B, K, -1), emb[B * K:, None]], 1)  # (B, K+1, D)
    cos = clip_cos_reward(feats, emb)  # (B, K+1)
    agg = clip_agg_reward(targets, emb)  # (B, K+1)
    w = cfg.agg_weight if "agg" in cfg.reward else 0.0
    sem = semantic_reward(cos, agg, w)  # (B, K+1)
    timing["clip"], t0 = time.perf_counter() - t0, time.perf_counter()

    # The discriminator scores the captions (naturalness reward), then takes its own step on
    # K corpus sentences per image against the K detached samples.
    stats = {}
    nat = torch.zeros_like(sem)
    d_loss = torch.zeros(())
    if use_gan:
        real = [parts.data.corpus[i] for i in real_idx.tolist()]
        batch = parts.disc_tok(real + captions + greedy, padding=True, return_tensors="pt").to(parts.device)
        with parts.autocast():
            logits = parts.disc_train(batch["input_ids"], batch["attention_mask"]).float()  # (2BK+B,)
        fake = naturalness_reward(logits[B * K:])  # (B*K + B,) samples, then greedy captions
        nat = torch.cat([fake[:B * K].view(B, K), fake[B * K:, None]], 1)  # (B, K+1)
        d_loss, d_stats = discriminator_loss(logits[:B * K], logits[B * K:2 * B * K])
        stats.update(d_stats)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip)
    timing["disc"], t0 = time.perf_counter() - t0, time.perf_counter()

    # The generator: lambda-mixed self-critical losses, each with its own greedy baseline.
    lam = lambda_schedule(step, cfg.lambda_hold, cfg.lambda_ramp, cfg.lambda_final)
    lam = lam if use_gan and use_sem else (1.0 if use_sem else 0.0)
    # The log-probs of the drawn captions, with gradient, in one teacher-forced pass.
    with parts.autocast():
        logp = token_log_probs(parts.gen_train(rep, flat_ids), flat_ids) * flat_mask  # (B*K, T)
    logp, mask = logp.view(B, K, -1), flat_mask.view(B, K, -1)  # (B, K, T)
    loo = cfg.baseline == "loo"
    loss_sem = scst_loss(logp, mask, sem[:, :K], None if loo else sem[:, K])
    loss_nat = scst_loss(logp, mask, nat[:, :K], None if loo else nat[:, K])
    loss = lam * loss_sem + (1 - lam) * loss_nat
    losses = {"loss_g": loss.item(), "loss_sem": loss_sem.item(), "loss_nat": loss_nat.item(),
              "d_loss": d_loss.item()}
    terms = parts.mean({**losses, "r_cos": cos.mean().item(), "r_agg": agg.mean().item(),
                        "r_nat": nat.mean().item()})
    for name, value in terms.items():
        if not math.isfinite(value):
            return {**losses, name: value}, stats
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(gen.parameters(), cfg.grad_clip)
    opt_g.step()
    if use_gan:
        opt_d.step()
    timing["backward"] = time.perf_counter() - t0
    stats.update({"lambda": lam, "r_cos": cos[:, :K].mean().item(), "r_agg": agg[:, :K].mean().item(),
                  "r_nat": nat[:, :K].mean().item(), "r_sem": sem[:, :K].mean().item(),
                  "len": (mask.sum(-1).mean().item()), "example": captions[0],
                  **{f"ms_{k}": 1000 * v for k, v in timing.items()}})
    return parts.mean(losses), parts.mean(stats)


def agg_targets(parts: Parts) -> torch.Tensor:
    """CLIP-agg targets for every training image (N, D), computed once in chunks and reused."""
    data, t = parts.data, parts.cfg.gan.temperature
    if data.train_agg_targets is not None and data.agg_temperature == t:
        return data.train_agg_targets
    return torch.cat([clip_agg_target(data.train_feats[i:i + 1024], data.corpus_feats, t)
                      for i in range(0, data.train_feats.shape[0], 1024)])


def train_gan(parts: Parts, run_dir: Path, log, resume: bool = False,
              stop_after: int | None = None) -> None:
    """Adversarial self-critical training from init.pt; keeps best.pt by validation CIDEr-D."""
    cfg, data, gen, disc = parts.cfg.gan, parts.data, parts.gen, parts.disc
    opt_g = torch.optim.AdamW(gen.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.d_lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(parts.cfg.seed + 1)
    targets_all = agg_targets(parts)  # (N, D)
    last, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if resume and last.is_file():
        blob = runs.load_checkpoint(last, parts, same_data=True)
        opt_g.load_state_dict(blob["opt_g"])
        opt_d.load_state_dict(blob["opt_d"])
        runs.set_rng_state(blob["rng"], g)
        start, best = blob["step"], blob["best"]
    else:
        parts.barrier()
        runs.load_checkpoint(run_dir / "init.pt", parts, sections=("gen",))
        torch.manual_seed(parts.cfg.seed + 2)
        start, best = 0, -1.0
    gen.train()
    disc.train()
    bar = tqdm(range(start, cfg.steps), desc=f"CgT-GAN ({cfg.reward})", initial=start,
               total=cfg.steps, dynamic_ncols=True, leave=False)
    for step in range(start, cfg.steps + 1):
        if (step % cfg.eval_every == 0 or step == cfg.steps) and parts.rank == 0:
            metrics, _ = evaluate_generator(parts, "val", cfg.eval_images)
            log({"stage": "gan", "step": step, **{f"val_{k}": v for k, v in metrics.items()}})
            if metrics["CIDEr-D"] > best:
                best = metrics["CIDEr-D"]
                runs.save_checkpoint(best_path, parts, step=step, stage="gan", val=metrics)
        parts.barrier() if step % cfg.eval_every == 0 else None
        if step == cfg.steps:
            break
        idx = torch.randperm(len(data.train_ids), generator=g)[:cfg.batch]
        feats, targets = data.train_feats[idx].to(parts.device), targets_all[idx].to(parts.device)
        losses, stats = gan_step(parts, opt_g, opt_d, feats, targets, step, g)
        check_finite(step + 1, "CgT-GAN", losses, last)
        log({"stage": "gan", "step": step + 1, **losses, **stats})
        bar.update(1)
        bar.set_postfix(nat=f"{stats.get('r_nat', 0):.2f}", cos=f"{stats['r_cos']:.1f}",
                        agg=f"{stats['r_agg']:.1f}", d_acc=f"{stats.get('d_acc', 0):.2f}",
                        lam=f"{stats['lambda']:.2f}")
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps or step + 1 == stop_after:
            runs.save_checkpoint(last, parts, opt_g=opt_g.state_dict(),
                                 opt_d=opt_d.state_dict(), rng=runs.rng_state(g), step=step + 1,
                                 best=best, stage="gan")
        if stop_after and step + 1 == stop_after:
            bar.close()
            return
    bar.close()


# ----------------------------------------------------------------------------------------------
# Runs: the stages end to end, the results table, the figures


def ensure_init(parts: Parts, run_dir: Path, log, resume: bool = False) -> None:
    """Run the text-only stage unless run_dir/init.pt already matches this config."""
    if runs.init_is_current(run_dir / "init.pt", parts):
        if parts.rank == 0:
            print(f"reusing the text-only initialisation in {run_dir / 'init.pt'}")
        return
    if not resume and parts.rank == 0:
        (run_dir / "init_last.pt").unlink(missing_ok=True)
    parts.barrier()
    t0 = time.time()
    train_init(parts, run_dir, log)
    if parts.rank == 0:
        print(f"text-only initialisation: {parts.cfg.init.steps} steps in {time.time() - t0:.0f}s")


def test_table(parts: Parts, run_dir: Path, rows: dict[str, Path | None]) -> dict:
    """Test metrics of each row: None is the retrieval baseline, a path a generator checkpoint."""
    es, out, captions = parts.data.splits["test"], {}, {}
    for label, ckpt in rows.items():
        if ckpt is None:
            caps = retrieval_captions(parts.data, es.feats)
            out[label] = score_captions(parts.data, "test", es.ids, caps)
        else:
            runs.load_checkpoint(ckpt, parts, sections=("gen",))
            out[label], caps = evaluate_generator(parts, "test")
        captions[label] = caps
    return {"metrics": out, "captions": captions}


def format_table(metrics: dict[str, dict], title: str) -> str:
    cols = ["CIDEr-D", "BLEU-4", "ROUGE-L", "fluency", "faithfulness", "length"]
    width = max(len(r) for r in metrics) + 2
    lines = [title, f"{'':{width}}" + "".join(f"{c:>13}" for c in cols)]
    for label, m in metrics.items():
        lines.append(f"{label:{width}}" + "".join(
            f"{m[c]:>13.1f}" if c in m else f"{'-':>13}" for c in cols))
    return "\n".join(lines)


def dataset_title(cfg: Config, data) -> str:
    """The name of the dataset whose val/test splits are scored, for printed tables (for ZS-IC
    runs, real.eval_split_file's dataset, not the training images')."""
    if cfg.data == "shapesworld":
        return "ShapesWorld"
    return real_config(cfg).eval_dataset_name() if cfg.data == "real" else data.name


def run_train(cfg: Config, data=None, resume: bool = False, stop_after: int | None = None,
              run_dir: Path | None = None, table: bool = True) -> dict | None:
    """The full pipeline: text-only init -> CgT-GAN -> test table, figures and results.json."""
    t0, cpu0 = time.time(), time.process_time()
    init_distributed(cfg)
    data = data if data is not None else load_data(cfg)
    run_dir = run_dir or runs.run_dir_for(cfg)
    parts = build_parts(cfg, data)
    log = runs.MetricsLog(run_dir / "metrics.jsonl", enabled=parts.rank == 0)
    if parts.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.write_config(run_dir, cfg, resume)
        if resume and (run_dir / "last.pt").is_file():
            log.truncate("gan", torch.load(run_dir / "last.pt", weights_only=True)["step"])
        elif not resume:
            log.path.unlink(missing_ok=True)
    ensure_init(parts, run_dir, log, resume)
    t1 = time.time()
    train_gan(parts, run_dir, log, resume=resume, stop_after=stop_after)
    parts.barrier()
    if parts.rank != 0 or stop_after:
        return None
    print(f"CgT-GAN ({cfg.gan.reward}): {cfg.gan.steps} steps in {time.time() - t1:.0f}s")
    result = test_table(parts, run_dir, {"retrieval (nearest corpus sentence)": None,
                                         "text-only init": run_dir / "init.pt",
                                         f"CgT-GAN ({cfg.gan.reward})": run_dir / "best.pt"})
    figures.draw_samples(parts.data, result["captions"][f"CgT-GAN ({cfg.gan.reward})"],
                 run_dir / "samples.png")
    figures.draw_curves(log.records(), run_dir / "curves.png")
    wall = time.time() - t0
    best = torch.load(run_dir / "best.pt", weights_only=True)
    cpu = time.process_time() - cpu0
    results = {"test": result["metrics"], "best_step": best["step"], "wall_s": round(wall, 1),
               "cpu_s": round(cpu, 1), "config": asdict(cfg)}
    from data import atomic_write
    atomic_write(run_dir / "results.json", lambda tmp: tmp.write_text(json.dumps(results, indent=2)))
    if table:
        print(format_table(result["metrics"], f"{dataset_title(cfg, data)} test split "
                           f"({len(data.splits['test'].ids)}"
                           f" images), seed {cfg.seed}; x100 except length (words)"))
        print(f"run folder {run_dir}; wall time {wall / 60:.1f} min (CPU time {cpu / 60:.1f} min, "
              f"{torch.get_num_threads()} threads)")
    return results


def run_ablation(cfg: Config, data=None) -> dict:
    """The paper's reward ablation from one initialisation: CLIP-cos, CLIP-agg, CLIP-agg + GAN."""
    import shutil
    t0 = time.time()
    data = data if data is not None else load_data(cfg)
    base = runs.run_dir_for(cfg).with_name(runs.run_dir_for(cfg).name + "_ablation")
    base.mkdir(parents=True, exist_ok=True)
    parts = build_parts(cfg, data)
    ensure_init(parts, base, runs.MetricsLog(base / "metrics.jsonl"))
    rows = {"text-only init": base / "init.pt"}
    for reward in ("cos", "agg", "agg+gan"):
        sub = base / reward
        sub.mkdir(exist_ok=True)
        shutil.copyfile(base / "init.pt", sub / "init.pt")
        run_cfg = Config(**{**cfg.__dict__})
        run_cfg.gan = type(cfg.gan)(**{**cfg.gan.__dict__, "reward": reward})
        run_train(run_cfg, data, run_dir=sub, table=False)
        rows[{"cos": "CLIP-cos", "agg": "CLIP-agg", "agg+gan": "CLIP-agg + GAN"}[reward]] = \
            sub / "best.pt"
    metrics = test_table(parts, base, rows)["metrics"]
    from data import atomic_write
    atomic_write(base / "ablation.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2)))
    print(format_table(metrics, f"Ablation on the {dataset_title(cfg, data)} test split, "
                       f"seed {cfg.seed}; x100 except length (words)"))
    print(f"run folder {base}; wall time {(time.time() - t0) / 60:.1f} min")
    return metrics


# ----------------------------------------------------------------------------------------------
# The other commands: init only, eval, caption


def run_init(cfg: Config, data=None, resume: bool = False) -> Path:
    data = data if data is not None else load_data(cfg)
    run_dir = runs.run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    runs.write_config(run_dir, cfg, resume)
    parts = build_parts(cfg, data, with_clip=False)
    ensure_init(parts, run_dir, runs.MetricsLog(run_dir / "metrics.jsonl"), resume)
    metrics, _ = evaluate_generator(parts, "val")
    print(format_table({"text-only init": metrics}, "validation split"))
    return run_dir / "init.pt"


def run_eval(cfg: Config, run_dir: Path, split: str, checkpoint: str = "best", data=None) -> dict:
    """Metrics of a checkpoint on a split, printed and written to run_dir/eval-<dataset>-<split>-
    <checkpoint>.json with the captions. Paper scale reads only that split (realdata.load_eval_data),
    which is real.eval_split_file's when set: a ZS-IC run is scored on another dataset that way."""
    if data is None and cfg.data == "real":
        import realdata

        data = realdata.load_eval_data(real_config(cfg), split)
    data = data if data is not None else load_data(cfg)
    parts = build_parts(cfg, data, with_clip=False)
    runs.load_checkpoint(run_dir / f"{checkpoint}.pt", parts, sections=("gen",))
    metrics, captions = evaluate_generator(parts, split)
    ids = data.splits[split].ids
    print(format_table({f"{run_dir.name} ({checkpoint}.pt)": metrics},
                       f"{dataset_title(cfg, data)} {split} split ({len(ids)} images)"))
    from data import atomic_write

    name = re.sub(r"\W+", "_", dataset_title(cfg, data))
    text = json.dumps({"dataset": dataset_title(cfg, data), "split": split, "checkpoint": checkpoint,
                       "metrics": metrics, "captions": dict(zip(ids, captions))}, indent=2)
    atomic_write(run_dir / f"eval-{name}-{split}-{checkpoint}.json", lambda tmp: tmp.write_text(text))
    return metrics


def run_caption(cfg: Config, run_dir: Path, images: list[str], data=None) -> list[tuple[str, str]]:
    """Captions for image files: CLIP image embedding -> generator (best.pt), greedy."""
    import clip_model

    missing = [p for p in images if not Path(p).is_file()]
    if missing:
        raise ConfigError(f"image file {missing[0]} not found"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    data = data if data is not None else load_data(cfg)
    parts = build_parts(cfg, data, with_clip=False)
    runs.load_checkpoint(run_dir / "best.pt", parts, sections=("gen",))
    clip, preprocess = clip_model.load(str(data.clip_path), device=parts.device)
    with torch.no_grad():
        pixels = preprocess([clip_model.load_image(p) for p in images]).to(parts.device)
        feats = F.normalize(clip.encode_image(pixels).float(), dim=-1)  # (n, D)
    return list(zip(images, caption_feats(parts, feats)))
