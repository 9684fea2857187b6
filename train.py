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
                    generator_loss, lambda_schedule, naturalness_reward, roberta_inputs,
                    semantic_reward)
from config import ConfigError, GANConfig, GeneratorConfig, InitConfig
from data import nearest, raw_rows, sum_over_processes
from decoding import dropout_active
from evaluate import score
from retokenize import mapped_rows
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

    The paper clips every GAN gradient at norm 1.0 (gan.grad_clip; 0 clips nothing, as the
    official initialisation). Under torchrun each process holds the loss of its own rows;
    averaging the gradients makes the update the one a single process would take on the whole
    batch, since every process has as many rows.
    """
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if run.distributed:
        average_gradients(module, run.world_size)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
    opt.step()


def average_gradients(module: torch.nn.Module, world_size: int) -> None:
    """Replace each parameter's gradient by its mean over the processes: one all-reduce of one
    flat buffer (a parameter without a gradient counts as zeros, so every process sends the same
    layout)."""
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    sum_over_processes(grads)
    for p, grad in zip(params, grads):
        p.grad = grad / world_size


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


def adamw(module: torch.nn.Module, lr: float, weight_decay: float,
          no_decay: str = "") -> torch.optim.AdamW:
    """AdamW, the paper's optimiser for the generator and the discriminator alike.

    Parameters whose name contains one of the comma-separated parts of `no_decay` form a second
    group without weight decay. The official code's "bias,LayerNorm.weight" exempts every bias
    and RoBERTa's LayerNorm weights (GPT-2's are named ln_1, ln_2, ln_f, and stay decayed).
    """
    parts = [p for p in no_decay.split(",") if p]
    named = list(module.named_parameters())
    exempt = [p for n, p in named if any(part in n for part in parts)]
    groups = [{"params": [p for n, p in named if not any(part in n for part in parts)],
               "weight_decay": weight_decay}]
    if exempt:
        groups.append({"params": exempt, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr)


def warmup_lr(lr: float, step: int, warmup: int) -> float:
    """The learning rate of update `step` (from 0): linear from 0 over `warmup` updates, then
    constant (transformers' get_constant_schedule_with_warmup, the official schedule).
    Example (lr 1e-5, warmup 150): step 0 -> 0, step 75 -> 5e-6, step 150 and later -> 1e-5."""
    return lr * min(1.0, step / warmup) if warmup > 0 else lr


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------------------------
# What each step sees: i.i.d. batches or shuffled epochs, and the prefix's CLIP embeddings


def total_steps(stage: InitConfig | GANConfig, n: int) -> int:
    """The steps of a stage over n items (corpus sentences or training images): epochs * (n //
    batch) in shuffled epochs (the last partial batch of each is dropped, as the official
    DataLoader's drop_last), else stage.steps."""
    if not stage.epochs:
        return stage.steps
    if n < stage.batch:
        raise ConfigError(f"an epoch of {n} items holds no batch of {stage.batch}; lower the "
                          "batch or train for a number of steps (epochs=0)")
    return stage.epochs * (n // stage.batch)


def epoch_rows(step: int, n: int, batch: int, generator: torch.Generator,
               order: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of `step` in shuffled epochs over n items: rows (batch,) and the epoch's
    order (n,). A fresh permutation is drawn from `generator` at each epoch's first step; pass the
    order back for the next step, and keep it in checkpoints, so that --resume ends the epoch it
    stopped in. Example (n 5, batch 2): steps 0 and 1 take order[0:2] and order[2:4], step 2
    starts the next epoch with a new order."""
    per_epoch = n // batch
    if step % per_epoch == 0 or order is None:
        order = torch.randperm(n, generator=generator)
    start = step % per_epoch * batch
    return order[start:start + batch], order


def prefix_input(cfg: GeneratorConfig, feats: torch.Tensor, norms: torch.Tensor | None,
                 what: str) -> torch.Tensor:
    """The CLIP embeddings (n, D) the mapping network reads: the unit rows as stored
    (gen.normalize_prefix), or the raw embeddings the official code feeds it, rebuilt from the
    unit rows and their norms (n,) (a DataError naming `what` when the data has none)."""
    if cfg.normalize_prefix:
        return feats
    return raw_rows(feats, norms, f"gen.normalize_prefix=false reads raw {what}")


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
    norms = None if images.norms is None else images.norms[:n]
    captions = caption_feats(run, prefix_input(run.cfg.gen, images.feats[:n], norms,
                                               f"{split} image embeddings"))
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
    feats (B, D) against target (B, T), then AdamW (gradients clipped at init.grad_clip). Returns
    the loss."""
    with run.autocast():
        loss = caption_loss(run.generator(feats, tokens), target)
    update(run, opt, run.generator, loss, run.cfg.init.grad_clip)
    return loss.item()


def init_sentences(run: Run, step: int, sentences: torch.Generator,
                   order: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This process's corpus rows at `step` (B,), and the epoch's order (None for i.i.d. batches):
    init.batch sentences drawn at random, or the step's slice of a shuffled epoch (init.epochs)."""
    cfg, m = run.cfg.init, len(run.data.corpus)
    if cfg.epochs:
        index, order = epoch_rows(step, m, cfg.batch, sentences, order)
    else:
        index = torch.randint(m, (cfg.batch,), generator=sentences)
    return index[shard(run, cfg.batch)], order


def init_prefix(run: Run, index: torch.Tensor, sentences: torch.Generator) -> torch.Tensor:
    """The prefix embeddings of corpus rows index (B,): their CLIP text embeddings (B, D), unit or
    raw (gen.normalize_prefix), with CapDec's noise when init.noise > 0 (not the paper's)."""
    data, cfg = run.data, run.cfg
    norms = None if data.corpus_norms is None else data.corpus_norms[index]
    feats = prefix_input(cfg.gen, data.corpus_feats[index], norms, "corpus text embeddings")
    if cfg.init.noise > 0:
        feats = feats + cfg.init.noise * torch.randn(feats.shape, generator=sentences)
        if cfg.gen.normalize_prefix:
            feats = F.normalize(feats, dim=-1)
    return feats


def train_init(run: Run, run_dir: Path, log, stop_after: int | None = None) -> None:
    """Train mapping network + GPT-2 to rebuild each corpus sentence from its CLIP text embedding.

    The prefix is the sentence's own CLIP *text* embedding; at test time it will be an *image*
    embedding. That swap is the modality gap the second stage closes by seeing real images.
    """
    cfg, data, gen = run.cfg.init, run.data, run.generator
    ids, labels = encode_sentences(run.gpt2_tokenizer, data.corpus, gen.end_id, gen.max_len)
    opt = adamw(gen, cfg.lr, cfg.weight_decay, cfg.no_decay)
    sentences = torch.Generator().manual_seed(run.cfg.seed)  # which sentences each step sees
    steps = total_steps(cfg, len(data.corpus))
    start, order = _resume_init(run, run_dir / "init_last.pt", opt, sentences)
    gen.train()
    bar = tqdm(range(start, steps), desc="text-only init", initial=start, total=steps,
               dynamic_ncols=True, leave=False, disable=not run.master_process)
    for step in bar:
        index, order = init_sentences(run, step, sentences, order)
        feats = init_prefix(run, index, sentences)  # (B, D)
        # Cut the batch to its longest sentence: the rest is padding that no label counts.
        width = int((labels[index] != IGNORE_INDEX).sum(1).max())
        set_lr(opt, warmup_lr(cfg.lr, step, cfg.warmup))
        loss = init_step(run, opt, feats.to(run.device), ids[index, :width].to(run.device),
                         labels[index, :width].to(run.device))
        check_finite(step + 1, "init", {"caption_loss": loss}, run_dir / "init_last.pt")
        log(mean_over_processes(run, {"stage": "init", "step": step + 1, "loss": loss}))
        bar.set_postfix(loss=f"{loss:.3f}")
        done, stopping = step + 1 == steps, stop_after == step + 1
        if done or stopping or (step + 1) % INIT_CKPT_EVERY == 0:
            rng = runs.gather_rng_state(run, sentences)  # every process takes part
            runs.save_checkpoint(run_dir / "init_last.pt", run, opt_g=opt.state_dict(), rng=rng,
                                 step=step + 1, stage="init", order=order, total=steps)
        if stopping and not done:
            return
    bar.close()
    runs.save_checkpoint(run_dir / "init.pt", run, step=steps, stage="init")
    if run.master_process:
        (run_dir / "init_last.pt").unlink(missing_ok=True)


def _resume_init(run: Run, path: Path, opt, sentences: torch.Generator) -> tuple[int, object]:
    """The step an interrupted initialisation resumes at (0 without init_last.pt) and its epoch's
    order (None: i.i.d. batches), with its weights, optimiser and random state restored."""
    if not path.is_file():
        return 0, None
    checkpoint = runs.load_checkpoint(path, run, same_data=True)
    opt.load_state_dict(checkpoint["opt_g"])
    runs.set_rng_state(checkpoint["rng"], sentences, run.rank)
    return checkpoint["step"], checkpoint.get("order")


# ----------------------------------------------------------------------------------------------
# Stage 2: CgT-GAN (Sec. 3.2-3.4)


@dataclass
class Batch:
    """What one CgT-GAN step sees, for this process's B images."""

    feats: torch.Tensor  # (B, D) CLIP image embeddings v (unit or raw: gen.normalize_prefix)
    agg_targets: torch.Tensor  # (B, D) CLIP-agg targets a of the same images
    uniforms: torch.Tensor  # (B, K, max_len) the random numbers behind the K samples' tokens
    real: list[str]  # B*K corpus sentences, the discriminator's real examples
    real_index: torch.Tensor  # (B*K,) int64: their rows in the corpus
    seeds: torch.Tensor  # (G,) int64: each dropout group's seed of the discriminator's masks
    group: torch.Tensor  # (B,) int64: each image's dropout group, an index into seeds


def draw_batch(run: Run, agg_targets: torch.Tensor, generator: torch.Generator,
               images: torch.Tensor | None = None) -> Batch:
    """A global batch of cfg.gan.batch training images, with their samples' random numbers, K
    corpus sentences per image and a dropout seed per group of images (gan.d_groups consecutive
    groups), drawn from `generator`; this process keeps its shard, and every group's seed. images
    (B,): the batch's training images, the step's slice of a shuffled epoch (`epoch_rows`); None
    draws B distinct images at random."""
    cfg, data = run.cfg.gan, run.data
    if images is None:
        images = torch.randperm(len(data.train_ids), generator=generator)[:cfg.batch]  # (B,)
    uniforms = torch.rand(cfg.batch, cfg.k, run.generator.max_len, generator=generator)
    real = torch.randint(len(data.corpus), (cfg.batch, cfg.k), generator=generator)  # (B, K)
    seeds = torch.randint(2**62, (cfg.d_groups,), generator=generator)  # (G,)
    # Image i of the B is in group floor(i G / B): G consecutive groups, whose sizes differ by
    # at most one, and W processes that divide G and B each hold whole ones.
    group = torch.arange(cfg.batch) * cfg.d_groups // cfg.batch  # (B,) 0 ... G-1
    rows = shard(run, cfg.batch)
    index, uniforms, real, group = images[rows], uniforms[rows], real[rows], group[rows]
    norms = None if data.train_norms is None else data.train_norms[index]
    feats = prefix_input(run.cfg.gen, data.train_feats[index], norms, "training image embeddings")
    real = real.flatten()  # (B*K,)
    return Batch(feats.to(run.device), agg_targets[index].to(run.device), uniforms,
                 [data.corpus[i] for i in real.tolist()], real, seeds, group)


def discriminate(run: Run, texts: list[str], group_of_row: torch.Tensor, seeds: torch.Tensor,
                 known: list[list[int] | None] | None = None) -> torch.Tensor:
    """D(c) for caption strings: RoBERTa tokens of each text (cut at run.disc_max_tokens) -> the
    discriminator's logit (N,). known (N,): token rows already known (see roberta_inputs).

    group_of_row (N,) says which dropout group (G,) each text belongs to: a group is gan.d_groups'
    share of the global batch's images (draw_batch), with their real sentences, samples and greedy
    captions. With dropout active, each group's rows go through RoBERTa in one forward, cut to the
    columns its own texts use, with torch's random state seeded by the group's seed: every dropout
    mask (hidden states and attention alike) is then a function of the group alone, never of the
    process that holds it or the groups beside it, so any number of processes that divides G
    computes the logits that one process computes. Without dropout, one forward for all rows.
    """
    ids, mask = roberta_inputs(run.roberta_tokenizer, texts, run.disc_max_tokens, known)  # (N, T)
    if not dropout_active(run.discriminator):
        return _discriminator_logits(run, ids.to(run.device), mask.to(run.device))
    # The rows sorted by group on the host (group g's are then one slice, in their order in
    # texts), so that the loop asks the device nothing.
    order = torch.argsort(group_of_row, stable=True)  # (N,)
    counts = torch.bincount(group_of_row, minlength=len(seeds)).tolist()  # (G,)
    lengths = mask[order].sum(1).tolist()  # (N,)
    ids, mask = ids[order].to(run.device), mask[order].to(run.device)  # (N, T)
    devices = [run.device] if run.device.type == "cuda" else []
    logits, start = [], 0
    for seed, count in zip(seeds.tolist(), counts):
        rows, start = slice(start, start + count), start + count
        if not count:
            continue  # a group another process holds
        width = max(lengths[rows])
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            logits.append(_discriminator_logits(run, ids[rows, :width], mask[rows, :width]))
    out = torch.empty(len(texts), device=run.device)  # (N,)
    out[order.to(run.device)] = torch.cat(logits)
    return out


def _discriminator_logits(run: Run, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The discriminator's logits (n,) of RoBERTa tokens ids (n, T) with attention mask (n, T)."""
    with run.autocast():
        return run.discriminator(ids, mask).float()  # (n,)


def real_rows(run: Run, index: torch.Tensor) -> list[list[int]]:
    """The RoBERTa ids of corpus sentences index (n,), cut at run.disc_max_tokens: rows of the corpus
    tokenised once per run (Run.corpus_roberta), not at every step."""
    ids, lengths = run.corpus_roberta  # (M, T), (M,)
    return [r[:n] for r, n in zip(ids[index].tolist(), lengths[index].tolist())]


def caption_rows(ids: torch.Tensor, mask: torch.Tensor, greedy_ids: torch.Tensor,
                 greedy_mask: torch.Tensor, end_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The B*K samples' rows (B, K, T) then the B greedy captions' (B, T'), padded with end_id to
    one width: ids and mask (B*K + B, max(T, T'))."""
    width = max(ids.shape[-1], greedy_ids.shape[-1])
    rows = [ids.flatten(0, 1), greedy_ids]  # (B*K, T), (B, T')
    masks = [mask.flatten(0, 1), greedy_mask]
    return (torch.cat([F.pad(x, (0, width - x.shape[1]), value=end_id) for x in rows]),
            torch.cat([F.pad(x, (0, width - x.shape[1])) for x in masks]))


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
    # The captions' tokens come to the host once: their text (for CLIP) and their RoBERTa tokens
    # (for D, looked up from the GPT-2 ids where that is exact) are made there.
    rows, row_mask = caption_rows(ids, mask, greedy_ids, greedy_mask, gen.end_id)  # (B*K+B, T)
    rows, row_mask = rows.cpu(), row_mask.cpu()
    captions = decode_captions(run.gpt2_tokenizer, rows, row_mask, gen.end_id)

    # Sec. 3.3: the semantic reward of every caption, CLIP-cos against its image and CLIP-agg
    # against the image's aggregated corpus embedding, mixed by agg_weight (0: CLIP-cos alone).
    emb = with_baseline(run.clip_text(captions), b, k)  # (B, K+1, D)
    r_cos = clip_cos_reward(batch.feats, emb)  # (B, K+1)
    r_agg = clip_agg_reward(batch.agg_targets, emb, raw=cfg.agg_raw)  # (B, K+1)
    r_sem = semantic_reward(r_cos, r_agg, cfg.agg_weight if cfg.reward.semantic == "agg" else 0.0)

    # Sec. 3.2: the discriminator's logit on each caption is its naturalness reward; then D's own
    # step, corpus sentences labelled real (1) and the K samples of each image fake (0).
    group = batch.group  # (B,) each image's dropout group
    per_sample = group.repeat_interleave(k)  # (B*K,)
    group_of_row = torch.cat([per_sample, per_sample, group])  # (2BK+B,) real, samples, greedy
    known = (real_rows(run, batch.real_index)
             + mapped_rows(run.roberta_tokenizer, run.gpt2_tokenizer, rows, row_mask, gen.end_id))
    d_all = discriminate(run, batch.real + captions, group_of_row, batch.seeds, known)
    d_real, d_fake = d_all[:b * k], d_all[b * k:]  # (B*K,), (B*K+B,)
    r_nat = with_baseline(naturalness_reward(d_fake), b, k)  # (B, K+1)
    d_loss, d_stats = discriminator_loss(d_real, d_fake[:b * k])
    update(run, opt_d, run.discriminator, d_loss, cfg.grad_clip)

    # Sec. 3.4: two self-critical losses, each sample's reward against its image's greedy caption
    # (or the other samples' mean, baseline=loo), mixed by lambda; then G's step, its learning
    # rate warmed up over the first gan.warmup steps.
    lam = reward_lambda(cfg, step)
    loss, g_stats = generator_loss(logp, mask, r_sem, r_nat, lam, cfg.baseline)
    set_lr(opt_g, warmup_lr(cfg.lr, step, cfg.warmup))
    update(run, opt_g, gen, loss, cfg.grad_clip)
    return {"loss_g": loss.item(), **g_stats, "d_loss": d_loss.item(), **d_stats, "lambda": lam,
            **{name: r[:, :k].mean().item() for name, r in
               (("r_cos", r_cos), ("r_agg", r_agg), ("r_nat", r_nat), ("r_sem", r_sem))},
            "len": mask.sum(-1).mean().item(), "example": captions[0]}


def agg_targets(run: Run) -> torch.Tensor:
    """CLIP-agg targets of every training image (N, D): `prepare`'s when it made them at this
    temperature and in this form (gan.agg_raw), else computed once here over the whole corpus."""
    data, t, raw = run.data, run.cfg.gan.temperature, run.cfg.gan.agg_raw
    if data.train_agg_targets is not None and (data.agg_temperature, data.agg_raw) == (t, raw):
        return data.train_agg_targets
    corpus = data.corpus_feats
    if raw:
        corpus = raw_rows(corpus, data.corpus_norms, "gan.agg_raw=true sums raw corpus embeddings")
    return clip_agg_target(data.train_feats, corpus, t, raw=raw)


def train_gan(run: Run, run_dir: Path, log, resume: bool = False,
              stop_after: int | None = None) -> None:
    """Adversarial self-critical training from init.pt; keeps best.pt by validation CIDEr-D."""
    cfg = run.cfg.gan
    opt_g = adamw(run.generator, cfg.lr, cfg.weight_decay, cfg.no_decay)
    opt_d = adamw(run.discriminator, cfg.d_lr, cfg.weight_decay, cfg.no_decay)
    # One generator draws every step's images, samples' random numbers and corpus sentences, so a
    # resumed run (which restores it) and any number of processes repeat the same steps.
    batches = torch.Generator().manual_seed(run.cfg.seed + 1)
    targets = agg_targets(run)  # (N, D)
    n, last = len(run.data.train_ids), run_dir / "last.pt"
    steps = total_steps(cfg, n)
    eval_every = cfg.eval_every or steps // cfg.epochs  # 0: after each epoch
    start, best, order = _resume_gan(run, run_dir, resume, opt_g, opt_d, batches)
    run.generator.train()
    run.discriminator.train()
    bar = tqdm(range(start, steps), desc=f"CgT-GAN ({cfg.reward})", initial=start,
               total=steps, dynamic_ncols=True, leave=False, disable=not run.master_process)
    for step in range(start, steps + 1):
        if step % eval_every == 0 or step == steps:
            best = _validate(run, run_dir / "best.pt", step, best, log)
        if step == steps:
            break
        images = None  # i.i.d. batches; in shuffled epochs, the step's slice of the epoch
        if cfg.epochs:
            images, order = epoch_rows(step, n, cfg.batch, batches, order)
        batch = draw_batch(run, targets, batches, images)
        stats = mean_over_processes(run, gan_step(run, opt_g, opt_d, batch, step))
        check_finite(step + 1, "CgT-GAN", stats, last)
        log({"stage": "gan", "step": step + 1, **stats})
        bar.update(1)
        bar.set_postfix(nat=f"{stats['r_nat']:.2f}", cos=f"{stats['r_cos']:.1f}",
                        agg=f"{stats['r_agg']:.1f}", d_acc=f"{stats['d_acc']:.2f}",
                        lam=f"{stats['lambda']:.2f}")
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 in (steps, stop_after):
            rng = runs.gather_rng_state(run, batches)  # every process takes part
            runs.save_checkpoint(last, run, opt_g=opt_g.state_dict(), opt_d=opt_d.state_dict(),
                                 rng=rng, step=step + 1, best=best, stage="gan", order=order,
                                 total=steps)
        if step + 1 == stop_after:
            break
    bar.close()


def _resume_gan(run: Run, run_dir: Path, resume: bool, opt_g, opt_d,
                batches: torch.Generator) -> tuple[int, float, object]:
    """(first step, best validation CIDEr-D so far, the epoch's order or None): from last.pt with
    --resume, else step 0 from the text-only generator in init.pt."""
    if resume and (run_dir / "last.pt").is_file():
        checkpoint = runs.load_checkpoint(run_dir / "last.pt", run, same_data=True)
        opt_g.load_state_dict(checkpoint["opt_g"])
        opt_d.load_state_dict(checkpoint["opt_d"])
        runs.set_rng_state(checkpoint["rng"], batches, run.rank)
        return checkpoint["step"], checkpoint["best"], checkpoint.get("order")
    run.barrier()
    runs.load_checkpoint(run_dir / "init.pt", run, sections=("gen",))
    # The generator's dropout (gen.dropout, 0 by default) draws from torch's global generator:
    # seeded apart from init's. The discriminator's is seeded per group of images (discriminate).
    torch.manual_seed(run.cfg.seed + 2)
    return 0, -1.0, None


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
