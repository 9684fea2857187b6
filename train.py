"""CgT-GAN's two training stages, and the evaluation that picks the checkpoint to test.

Follows CgT-GAN (Yu et al., arXiv:2308.12045). Stage 1, the text-only initialisation (Sec. 3.1):
the generator learns to rebuild each corpus sentence from CLIP's text embedding of it. Stage 2,
CgT-GAN itself (Sec. 3.4): on unpaired images the generator samples K captions per image and is
trained by self-critical policy gradient on two rewards, CLIP's semantic reward (Sec. 3.3) and the
discriminator's naturalness reward (Sec. 3.2), while the discriminator learns to tell its captions
from corpus sentences. `gan_step` is that step, in the paper's order; `train_gan` is the loop
around it (batches, data-parallel shards, validation, checkpoints, the log).

The equations live in cgtgan.py and are called here by name; runs.py sets a run up and keeps its
folder; cli.py chains the stages into the commands.

Shape legend: B images, K samples per image, T tokens, D CLIP width, N training images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import runs
from cgtgan import (IGNORE_INDEX, caption_loss, clip_agg_reward, clip_agg_target,
                    clip_cos_reward, decode_captions, discriminator_loss, encode_sentences,
                    lambda_schedule, naturalness_reward, scst_loss, semantic_reward)
from config import ConfigError, GANConfig
from data import nearest
from evaluate import score
from runs import Run

# Text-only checkpoints (init_last.pt, for --resume) are written every this many steps.
INIT_CKPT_EVERY = 500


class TrainingError(RuntimeError):
    """A run that must stop (NaN loss): the message names the step, the term and the checkpoint."""


def check_finite(step: int, stage: str, terms: dict, checkpoint: Path) -> None:
    """Stop with a one-line message when a loss or reward term is NaN or infinite.

    Called after each step and before anything is saved, so the checkpoint on disk is the last
    good one.
    """
    for name, value in terms.items():
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise TrainingError(f"{stage} step {step}: {name} is {value}; stopped, the last good "
                                f"checkpoint is kept at {checkpoint}")


# ----------------------------------------------------------------------------------------------
# One optimiser step, in one process or in many


def update(run: Run, opt: torch.optim.Optimizer, module: torch.nn.Module, loss: torch.Tensor,
           grad_clip: float) -> None:
    """Backprop, average over data-parallel processes, clip, update (minGPT's trainer, labelled).

    The paper clips every gradient at norm 1.0 (gan.grad_clip). Under torchrun each process holds
    the loss of its own rows; averaging the gradients makes the update the one a single process
    would take on the whole batch, since every process has as many rows.
    """
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if run.distributed:
        average_gradients(module, run.world_size)
    torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    opt.step()


def average_gradients(module: torch.nn.Module, world_size: int) -> None:
    """Replace each parameter's gradient by its mean over the processes: one all-reduce of one
    flat buffer (a parameter without a gradient counts as zeros, so every process sends the same
    layout)."""
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (number of parameters,)
    torch.distributed.all_reduce(flat)
    flat /= world_size
    for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(p).clone()


def shard(run: Run, n: int) -> slice:
    """This process's rows of a global batch of n rows (all of them in one process).

    Every process draws the random numbers of the whole batch from the same generator and keeps
    its own rows, so any number of processes reproduces one.
    """
    if n % run.world_size:
        raise ConfigError(f"batch {n} does not split evenly over {run.world_size} processes")
    return slice(run.rank * n // run.world_size, (run.rank + 1) * n // run.world_size)


def mean_over_processes(run: Run, stats: dict) -> dict:
    """Numeric stats averaged over the processes, for the log (identity in one process)."""
    if not run.distributed:
        return stats
    keys = [k for k, v in stats.items() if isinstance(v, (int, float))]
    values = torch.tensor([float(stats[k]) for k in keys], device=run.device)
    torch.distributed.all_reduce(values)
    return {**stats, **dict(zip(keys, (values / run.world_size).tolist()))}


def adamw(module: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, the paper's optimiser for the generator and the discriminator alike."""
    return torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)


# ----------------------------------------------------------------------------------------------
# Evaluation: greedy captions of a split, scored against its references


@torch.no_grad()
def caption_feats(run: Run, feats: torch.Tensor, batch: int = 256) -> list[str]:
    """Captions for CLIP image embeddings (n, D): greedy (the paper's test-time decoding), or beam
    search when cfg.decode == "beam"."""
    gen = run.generator
    # Evaluation mode switches dropout off; training mode is restored for the caller.
    gen.eval()
    out = []
    for start in range(0, feats.shape[0], batch):
        f = feats[start:start + batch].to(run.device)
        with run.autocast():
            ids, mask = gen.beam_search(f) if run.cfg.decode == "beam" else gen.greedy(f)
        out += decode_captions(run.gpt2_tokenizer, ids, mask, gen.end_id)
    gen.train()
    return out


def score_captions(data, split: str, ids: list[str], captions: list[str]) -> dict:
    """CIDEr-D, BLEU-4, ROUGE-L (x100), fluency and faithfulness (x100), mean length in words.

    Fluency and faithfulness come from ShapesWorld's checker, which knows each scene's truth; real
    datasets have none, so their tables carry the caption metrics alone.
    """
    candidates = dict(zip(ids, captions))
    metrics = score(candidates, {i: data.splits[split].references[i] for i in ids})
    out = {k: 100 * metrics[k] for k in ("CIDEr-D", "BLEU-4", "ROUGE-L")}
    checked = data.check(candidates, split)
    if checked:
        out.update({k: 100 * checked[k] for k in ("fluency", "faithfulness")})
    out["length"] = sum(len(c.split()) for c in captions) / max(1, len(captions))
    return out


def evaluate_generator(run: Run, split: str, limit: int = 0) -> tuple[dict, list[str]]:
    """The generator's metrics on a split (its first `limit` images; 0: all) and its captions."""
    images = run.data.splits[split]
    n = limit or len(images.ids)
    captions = caption_feats(run, images.feats[:n])
    return score_captions(run.data, split, images.ids[:n], captions), captions


def retrieval_captions(data, feats: torch.Tensor, chunk: int = 8192) -> list[str]:
    """The CLIPRe-like baseline: for each image (n, D), the corpus sentence whose CLIP text
    embedding is nearest. It shows what the corpus alone can say, without a captioner."""
    _, arg = nearest(feats, data.corpus_feats, chunk)  # (n,)
    return [data.corpus[i] for i in arg.tolist()]


# ----------------------------------------------------------------------------------------------
# Stage 1: text-only initialisation (Sec. 3.1)


def init_step(run: Run, opt, feats: torch.Tensor, tokens: torch.Tensor,
              target: torch.Tensor) -> float:
    """One text-only step: the caption cross-entropy of tokens (B, T) from CLIP text embeddings
    feats (B, D) against target (B, T), then AdamW with clipping at 1.0. Returns the loss."""
    with run.autocast():
        loss = caption_loss(run.generator(feats, tokens), target)
    update(run, opt, run.generator, loss, 1.0)
    return loss.item()


def train_init(run: Run, run_dir: Path, log, stop_after: int | None = None) -> None:
    """Train mapping network + GPT-2 to rebuild each corpus sentence from its CLIP text embedding.

    The prefix is the sentence's own CLIP *text* embedding; at test time it will be an *image*
    embedding. That swap is the modality gap the second stage closes by seeing real images.
    """
    cfg, data, gen = run.cfg.init, run.data, run.generator
    ids, labels = encode_sentences(run.gpt2_tokenizer, data.corpus, gen.end_id, gen.max_len)
    opt = adamw(gen, cfg.lr, cfg.weight_decay)
    sentences = torch.Generator().manual_seed(run.cfg.seed)  # which sentences each step sees
    start = _resume_init(run, run_dir / "init_last.pt", opt, sentences)
    gen.train()
    bar = tqdm(range(start, cfg.steps), desc="text-only init", initial=start, total=cfg.steps,
               dynamic_ncols=True, leave=False)
    for step in bar:
        index = torch.randint(len(data.corpus), (cfg.batch,), generator=sentences)[shard(run, cfg.batch)]
        feats = data.corpus_feats[index]  # (B, D)
        if cfg.noise > 0:  # CapDec's noise injection, an option the paper does not use
            feats = F.normalize(feats + cfg.noise * torch.randn(feats.shape, generator=sentences), dim=-1)
        # Cut the batch to its longest sentence: the rest is padding that no label counts.
        width = int((labels[index] != IGNORE_INDEX).sum(1).max())
        loss = init_step(run, opt, feats.to(run.device), ids[index, :width].to(run.device),
                         labels[index, :width].to(run.device))
        check_finite(step + 1, "init", {"caption_loss": loss}, run_dir / "init_last.pt")
        log(mean_over_processes(run, {"stage": "init", "step": step + 1, "loss": loss}))
        bar.set_postfix(loss=f"{loss:.3f}")
        done, stopping = step + 1 == cfg.steps, stop_after == step + 1
        if done or stopping or (step + 1) % INIT_CKPT_EVERY == 0:
            rng = runs.gather_rng_state(run, sentences)  # every process takes part
            runs.save_checkpoint(run_dir / "init_last.pt", run, opt_g=opt.state_dict(), rng=rng,
                                 step=step + 1, stage="init")
        if stopping and not done:
            return
    bar.close()
    runs.save_checkpoint(run_dir / "init.pt", run, step=cfg.steps, stage="init")
    if run.master_process:
        (run_dir / "init_last.pt").unlink(missing_ok=True)


def _resume_init(run: Run, path: Path, opt, sentences: torch.Generator) -> int:
    """The step an interrupted initialisation resumes at (0 without init_last.pt), with its
    weights, optimiser and random state restored."""
    if not path.is_file():
        return 0
    checkpoint = runs.load_checkpoint(path, run, same_data=True)
    opt.load_state_dict(checkpoint["opt_g"])
    runs.set_rng_state(checkpoint["rng"], sentences, run.rank)
    return checkpoint["step"]


# ----------------------------------------------------------------------------------------------
# Stage 2: CgT-GAN (Sec. 3.2-3.4)


@dataclass
class Batch:
    """What one CgT-GAN step sees, for this process's B images."""

    feats: torch.Tensor  # (B, D) CLIP image embeddings v
    agg_targets: torch.Tensor  # (B, D) CLIP-agg targets a of the same images
    uniforms: torch.Tensor  # (B, K, max_len) the random numbers behind the K samples' tokens
    real: list[str]  # B*K corpus sentences, the discriminator's real examples
    seeds: torch.Tensor  # (B,) int64: each image's seed of the discriminator's dropout masks


def draw_batch(run: Run, agg_targets: torch.Tensor, generator: torch.Generator) -> Batch:
    """A global batch of cfg.gan.batch random training images, with their samples' random numbers,
    K corpus sentences per image and a dropout seed per image, drawn from `generator`; this
    process keeps its shard."""
    cfg, data = run.cfg.gan, run.data
    index = torch.randperm(len(data.train_ids), generator=generator)[:cfg.batch]  # (B,)
    uniforms = torch.rand(cfg.batch, cfg.k, run.generator.max_len, generator=generator)
    real = torch.randint(len(data.corpus), (cfg.batch, cfg.k), generator=generator)  # (B, K)
    seeds = torch.randint(2**62, (cfg.batch,), generator=generator)  # (B,)
    rows = shard(run, cfg.batch)
    index, uniforms, real, seeds = index[rows], uniforms[rows], real[rows], seeds[rows]
    return Batch(data.train_feats[index].to(run.device), agg_targets[index].to(run.device),
                 uniforms, [data.corpus[i] for i in real.flatten().tolist()], seeds)


def discriminate(run: Run, texts: list[str], image_of_row: torch.Tensor,
                 seeds: torch.Tensor) -> torch.Tensor:
    """D(c) for caption strings: RoBERTa tokens of each text -> the discriminator's logit (N,).

    image_of_row (N,) says which of this process's B images each text belongs to. With dropout
    active, each image's rows go through RoBERTa together, with torch's random state seeded by the
    image's seed (B,) from draw_batch: every dropout mask (hidden states and attention alike) is
    then a function of the image's seed alone, never of the process that holds the image or the
    rows beside it, so any number of processes computes the logits that one process computes.
    Without dropout the rows go through in one forward.
    """
    tokens = run.roberta_tokenizer(texts, padding=True, return_tensors="pt").to(run.device)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]  # (N, T) each
    if not (run.discriminator.training and any(
            isinstance(m, torch.nn.Dropout) and m.p > 0 for m in run.discriminator.modules())):
        return _discriminator_logits(run, ids, mask)
    logits = torch.empty(len(texts), device=run.device)  # (N,)
    devices = [run.device] if run.device.type == "cuda" else []
    for b, seed in enumerate(seeds.tolist()):
        rows = (image_of_row == b).nonzero().squeeze(1).to(run.device)  # (rows of image b,)
        used = mask[rows].any(0)  # (T,) the columns of the image's texts, without extra padding
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            logits[rows] = _discriminator_logits(run, ids[rows][:, used], mask[rows][:, used])
    return logits


def _discriminator_logits(run: Run, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The discriminator's logits (n,) of RoBERTa tokens ids (n, T) with attention mask (n, T)."""
    with run.autocast():
        return run.discriminator(ids, mask).float()  # (n,)


def with_baseline(x: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """Rows for B*K samples then B greedy captions, (B*K + B, ...) -> (B, K+1, ...): each image's
    K samples, then its greedy caption (the baseline) at index K."""
    return torch.cat([x[:b * k].view(b, k, *x.shape[1:]), x[b * k:, None]], 1)


def reward_lambda(cfg: GANConfig, step: int) -> float:
    """lambda of L_G = lambda * L_sem + (1 - lambda) * L_nat: the paper's schedule when both
    rewards are on, 1 for a semantic reward alone and 0 for naturalness alone (the ablations)."""
    if not cfg.reward.naturalness:
        return 1.0
    if cfg.reward.semantic is None:
        return 0.0
    return lambda_schedule(step, cfg.lambda_hold, cfg.lambda_ramp, cfg.lambda_final)


def gan_step(run: Run, opt_g, opt_d, batch: Batch, step: int) -> dict:
    """One CgT-GAN step on B images (Sec. 3.4): sample, reward, update D, update G. -> stats."""
    cfg, gen, b, k = run.cfg.gan, run.generator, batch.feats.shape[0], run.cfg.gan.k
    # Sec. 3.4: K captions sampled per image, with their token log-probs (these carry the
    # gradient), and the greedy caption, the self-critical baseline.
    with run.autocast():
        ids, logp, mask = gen.sample(batch.feats, k, batch.uniforms)  # (B, K, T) each
        greedy_ids, greedy_mask = gen.greedy(batch.feats)  # (B, T)
    captions = (decode_captions(run.gpt2_tokenizer, ids.flatten(0, 1), mask.flatten(0, 1), gen.end_id)
                + decode_captions(run.gpt2_tokenizer, greedy_ids, greedy_mask, gen.end_id))

    # Sec. 3.3: the semantic reward of every caption, CLIP-cos against its image and CLIP-agg
    # against the image's aggregated corpus embedding, mixed by agg_weight (0: CLIP-cos alone).
    emb = with_baseline(run.clip_text(captions), b, k)  # (B, K+1, D)
    r_cos = clip_cos_reward(batch.feats, emb)  # (B, K+1)
    r_agg = clip_agg_reward(batch.agg_targets, emb)  # (B, K+1)
    r_sem = semantic_reward(r_cos, r_agg, cfg.agg_weight if cfg.reward.semantic == "agg" else 0.0)

    # Sec. 3.2: the discriminator's logit on each caption is its naturalness reward; then D's own
    # step, corpus sentences labelled real (1) and the K samples of each image fake (0).
    image = torch.arange(b)
    image_of_row = torch.cat([image.repeat_interleave(k), image.repeat_interleave(k), image])  # (2BK+B,)
    d_all = discriminate(run, batch.real + captions, image_of_row, batch.seeds)
    d_real, d_fake = d_all[:b * k], d_all[b * k:]  # (B*K,), (B*K+B,)
    r_nat = with_baseline(naturalness_reward(d_fake), b, k)  # (B, K+1)
    d_loss, d_stats = discriminator_loss(d_real, d_fake[:b * k])
    update(run, opt_d, run.discriminator, d_loss, cfg.grad_clip)

    # Sec. 3.4: two self-critical losses, each sample's reward against its image's greedy caption
    # (or the other samples' mean, baseline=loo), mixed by lambda; then G's step.
    loo = cfg.baseline == "loo"
    loss_sem = scst_loss(logp, mask, r_sem[:, :k], None if loo else r_sem[:, k])
    loss_nat = scst_loss(logp, mask, r_nat[:, :k], None if loo else r_nat[:, k])
    lam = reward_lambda(cfg, step)
    loss = lam * loss_sem + (1 - lam) * loss_nat
    update(run, opt_g, gen, loss, cfg.grad_clip)
    return {"loss_g": loss.item(), "loss_sem": loss_sem.item(), "loss_nat": loss_nat.item(),
            "d_loss": d_loss.item(), **d_stats, "lambda": lam,
            **{name: r[:, :k].mean().item() for name, r in
               (("r_cos", r_cos), ("r_agg", r_agg), ("r_nat", r_nat), ("r_sem", r_sem))},
            "len": mask.sum(-1).mean().item(), "example": captions[0]}


def agg_targets(run: Run) -> torch.Tensor:
    """CLIP-agg targets of every training image (N, D): `prepare`'s when it made them at this
    temperature, else computed once here over the whole corpus."""
    data, t = run.data, run.cfg.gan.temperature
    if data.train_agg_targets is not None and data.agg_temperature == t:
        return data.train_agg_targets
    return clip_agg_target(data.train_feats, data.corpus_feats, t)


def train_gan(run: Run, run_dir: Path, log, resume: bool = False,
              stop_after: int | None = None) -> None:
    """Adversarial self-critical training from init.pt; keeps best.pt by validation CIDEr-D."""
    cfg = run.cfg.gan
    opt_g = adamw(run.generator, cfg.lr, cfg.weight_decay)
    opt_d = adamw(run.discriminator, cfg.d_lr, cfg.weight_decay)
    # One generator draws every step's images, samples' random numbers and corpus sentences, so a
    # resumed run (which restores it) and any number of processes repeat the same steps.
    batches = torch.Generator().manual_seed(run.cfg.seed + 1)
    targets = agg_targets(run)  # (N, D)
    last = run_dir / "last.pt"
    start, best = _resume_gan(run, run_dir, resume, opt_g, opt_d, batches)
    run.generator.train()
    run.discriminator.train()
    bar = tqdm(range(start, cfg.steps), desc=f"CgT-GAN ({cfg.reward})", initial=start,
               total=cfg.steps, dynamic_ncols=True, leave=False)
    for step in range(start, cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            best = _validate(run, run_dir / "best.pt", step, best, log)
        if step == cfg.steps:
            break
        stats = mean_over_processes(run, gan_step(run, opt_g, opt_d, draw_batch(run, targets, batches),
                                                  step))
        check_finite(step + 1, "CgT-GAN", stats, last)
        log({"stage": "gan", "step": step + 1, **stats})
        bar.update(1)
        bar.set_postfix(nat=f"{stats['r_nat']:.2f}", cos=f"{stats['r_cos']:.1f}",
                        agg=f"{stats['r_agg']:.1f}", d_acc=f"{stats['d_acc']:.2f}",
                        lam=f"{stats['lambda']:.2f}")
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 in (cfg.steps, stop_after):
            rng = runs.gather_rng_state(run, batches)  # every process takes part
            runs.save_checkpoint(last, run, opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict(),
                                 rng=rng, step=step + 1, best=best, stage="gan")
        if step + 1 == stop_after:
            break
    bar.close()


def _resume_gan(run: Run, run_dir: Path, resume: bool, opt_g, opt_d,
                batches: torch.Generator) -> tuple[int, float]:
    """(first step, best validation CIDEr-D so far): from last.pt with --resume, else step 0 from
    the text-only generator in init.pt."""
    if resume and (run_dir / "last.pt").is_file():
        checkpoint = runs.load_checkpoint(run_dir / "last.pt", run, same_data=True)
        opt_g.load_state_dict(checkpoint["opt_g"])
        opt_d.load_state_dict(checkpoint["opt_d"])
        runs.set_rng_state(checkpoint["rng"], batches, run.rank)
        return checkpoint["step"], checkpoint["best"]
    run.barrier()
    runs.load_checkpoint(run_dir / "init.pt", run, sections=("gen",))
    # The generator's dropout (gen.dropout, 0 by default) draws from torch's global generator:
    # seeded apart from init's. The discriminator's is seeded per image (discriminate).
    torch.manual_seed(run.cfg.seed + 2)
    return 0, -1.0


def _validate(run: Run, best_path: Path, step: int, best: float, log) -> float:
    """Validation CIDEr-D of the generator (master process); after step 0, best.pt is replaced
    when it beats the best so far, which is returned. The paper tests the CgT-GAN checkpoint with
    the best val CIDEr. Step 0 is the text-only initialisation itself: logged for the curves, but
    no candidate, so best.pt (the table's CgT-GAN row) always holds a CgT-GAN-trained generator."""
    if run.master_process:
        metrics, _ = evaluate_generator(run, "val", run.cfg.gan.eval_images)
        log({"stage": "gan", "step": step, **{f"val_{k}": v for k, v in metrics.items()}})
        if step > 0 and metrics["CIDEr-D"] > best:
            best = metrics["CIDEr-D"]
            runs.save_checkpoint(best_path, run, step=step, stage="gan", val=metrics)
    run.barrier()
    return best
