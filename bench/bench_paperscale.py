"""Benchmark of CgT-GAN at the paper's sizes: milliseconds and peak GPU memory per training step.

Models with random weights in the released formats (GPT-2 124M, RoBERTa-base, a ViT-L/14 CLIP in
fp16; tests/fixtures.py) and a dataset in the real formats (Karpathy split file, COCO image folders,
in-domain corpus) with enough training images for a batch of 128. With the coco preset's sizes
(B=128 images, its global batch, in one process; K=5 samples each, captions of at most 20 tokens)
it times, through train.py's own code:

  text-only init step   train.init_step: caption loss on B corpus sentences at 20 tokens,
                        backward, AdamW step
  CgT-GAN step          train.gan_step: sampling B*K captions + B greedy baselines, CLIP scoring,
                        discriminator step, self-critical backward
  sampler               CaptionGenerator._decode (the token loop of .sample) and .sample against transformers'
                        generate(do_sample=True) on the same GPT-2 and the same B*K prefixes

each in fp32 and, on CUDA, with bf16 autocast (cfg.bf16), with torch.cuda.max_memory_allocated.
A random generator almost never emits the end token ".", so every caption runs to the 20-token cap
and its decoded text is gibberish: the worst case for sampling, tokenising and CLIP.

    python bench/bench_paperscale.py                           # CUDA when present, else the CPU
    python bench/bench_paperscale.py --tiny --device cpu       # the fixture's tiny models: seconds
    python bench/bench_paperscale.py --workdir /tmp/ps --json out.json
    python bench/bench_paperscale.py --host-only                # host work per step: a minute

--workdir keeps the models, dataset and caches (reused by a second run) and writes cli_args.txt:
the `--set` options that point `cgtgan.py train --preset coco` at them.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import cgtgan  # noqa: E402
import commands  # noqa: E402
import config  # noqa: E402
import runs  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
from fixtures import (SPLITS, build_paperscale_fixture, save_full_size_clip,  # noqa: E402
                      save_full_size_models)

# Training images in the fixture's default split file (Karpathy's restval images train too).
DEFAULT_TRAIN_IMAGES = sum(split in ("train", "restval") for split in SPLITS)


# ----------------------------------------------------------------------------------------------
# Models and data on disk, then a Config that points the coco preset at them


def build_inputs(root: Path, tiny: bool, batch: int, device: torch.device) -> dict:
    """Write the dataset and models under root (once: reused when root/inputs.json exists) and
    return the `--set` options (key -> value) that point the coco preset at them."""
    marker = root / "inputs.json"
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved["tiny"] == tiny and saved["batch"] >= batch:
            return saved["options"]
    n_train = max(0, batch - DEFAULT_TRAIN_IMAGES)
    fx = build_paperscale_fixture(root / "data", models=tiny, n_train=n_train)
    if tiny:
        clip, clip_bpe, gpt2, roberta = fx.clip, fx.clip_bpe, fx.gpt2, fx.roberta
    else:
        split = json.loads(fx.split_file.read_text())
        sentences = [s["raw"] for e in split["images"] for s in e["sentences"]]
        clip, clip_bpe = root / "ViT-L-14.pt", root / "clip_bpe.txt.gz"
        gpt2, roberta = root / "gpt2", root / "roberta-base"
        save_full_size_clip(clip, clip_bpe, sentences,
                            device="cuda" if device.type == "cuda" else "cpu")
        save_full_size_models(gpt2, roberta, sentences)
    options = {"real.split_file": fx.split_file, "real.image_root": fx.image_root,
               "real.clip": clip, "real.clip_bpe": clip_bpe, "real.gpt2": gpt2,
               "real.roberta": roberta, "real.cache_dir": root / "cache", "real.workers": 0,
               "real.progress": False}
    options = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in options.items()}
    marker.write_text(json.dumps({"tiny": tiny, "batch": batch, "options": options}, indent=2))
    return options


def make_config(options: dict, args) -> config.Config:
    """The coco preset with the fixture's paths and this run's device, batch and K."""
    cfg = config.apply_overrides(config.Config(), config.PRESETS["coco"])
    return config.apply_overrides(cfg, {**options, "device": args.device, "threads": args.threads,
                                        "gan.batch": args.batch, "gan.k": args.k,
                                        "init.batch": args.batch, "name": "bench"})


# ----------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, steps: int, device: torch.device) -> dict:
    """Median milliseconds of fn() over `steps` calls after one warm-up call, the last call's
    result, and the peak GPU memory (GiB) over the timed calls (None on the CPU)."""
    fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, out = [], None
    for _ in range(steps):
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"ms": statistics.median(times), "peak_gib": peak, "last": out}


def init_step(parts: runs.Run, opt, g: torch.Generator):
    """One train.init_step on B sentences at the 20-token cap (random tokens: the longest batch
    the preset allows). Returns a function of no arguments."""
    gen, B = parts.generator, parts.cfg.init.batch
    vocab = len(parts.gpt2_tokenizer)

    def step() -> float:
        tokens = torch.randint(vocab, (B, gen.max_len), generator=g)  # (B, T)
        tokens[:, -1] = gen.end_id
        feats = parts.data.corpus_feats[torch.randint(len(parts.data.corpus), (B,), generator=g)]
        tokens, feats = tokens.to(parts.device), feats.to(parts.device)  # (B, T), (B, D)
        return train.init_step(parts, opt, feats, tokens, tokens)
    return step


def gan_step(parts: runs.Run, opt_g, opt_d, targets: torch.Tensor, g: torch.Generator):
    """One train.gan_step on B random training images, with both rewards on (lambda ramped)."""
    cfg, data = parts.cfg.gan, parts.data
    step_no = cfg.lambda_hold + cfg.lambda_ramp

    def step() -> dict:
        return train.gan_step(parts, opt_g, opt_d, train.draw_batch(parts, targets, g), step_no)
    return step


def precisions(device: torch.device) -> list[bool]:
    """bf16 settings to time: autocast is CUDA-only in runs.Run, so the CPU times fp32 alone."""
    return [False, True] if device.type == "cuda" else [False]


def time_steps(parts: runs.Run, steps: int) -> dict:
    """The init and CgT-GAN steps in each precision: ms, peak GiB, losses and the split."""
    cfg, results = parts.cfg, {}
    targets = train.agg_targets(parts)  # (N, D)
    for bf16 in precisions(parts.device):
        cfg.bf16 = bf16
        name = "bf16" if bf16 else "fp32"
        g = torch.Generator().manual_seed(cfg.seed)
        parts.generator.train()
        parts.discriminator.train()
        opt = torch.optim.AdamW(parts.generator.parameters(), lr=cfg.init.lr,
                                weight_decay=cfg.init.weight_decay)
        r = measure(init_step(parts, opt, g), steps, parts.device)
        results[f"init_{name}"] = {"ms": r["ms"], "peak_gib": r["peak_gib"], "loss": r["last"]}
        print(step_line(f"init_{name}", results[f"init_{name}"]), flush=True)
        del opt
        opt_g = torch.optim.AdamW(parts.generator.parameters(), lr=cfg.gan.lr,
                                  weight_decay=cfg.gan.weight_decay)
        opt_d = torch.optim.AdamW(parts.discriminator.parameters(), lr=cfg.gan.d_lr,
                                  weight_decay=cfg.gan.weight_decay)
        r = measure(gan_step(parts, opt_g, opt_d, targets, g), steps, parts.device)
        stats = r["last"]
        results[f"gan_{name}"] = {
            "ms": r["ms"], "peak_gib": r["peak_gib"],
            **{k: stats[k] for k in ("loss_g", "loss_sem", "loss_nat", "d_loss", "len", "example")}}
        print(step_line(f"gan_{name}", results[f"gan_{name}"]), flush=True)
        del opt_g, opt_d
        if parts.device.type == "cuda":
            torch.cuda.empty_cache()
    cfg.bf16 = False
    return results


def time_sampler(parts: runs.Run, repeats: int) -> dict:
    """Our sampler against transformers' generate(do_sample=True), B*K rows, same prefixes."""
    gen, cfg, device = parts.generator, parts.cfg, parts.device
    B, K = cfg.gan.batch, cfg.gan.k
    feats = parts.data.train_feats[:B].to(device).repeat_interleave(K, 0)  # (B*K, D)
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B * K, cfg.gen.prefix_len, dtype=torch.long, device=device)  # (B*K, P)
    gen.eval()
    results = {}

    def ours():
        with parts.autocast():
            return gen._decode(feats, torch.rand(len(feats), gen.max_len, generator=g))[1].sum(-1).mean().item()

    def ours_sample():
        with parts.autocast():
            logp = gen.sample(feats[::K], K, generator=g)[1]  # (B, K, T) with gradient
        return logp.sum().item()

    def theirs():
        with torch.no_grad(), parts.autocast():
            out = gen.gpt.generate(inputs_embeds=gen.mapping(feats), attention_mask=mask,
                                   do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                   max_new_tokens=gen.max_len, eos_token_id=gen.end_id,
                                   pad_token_id=gen.end_id)
        return out.shape[1]

    for bf16 in precisions(device):
        cfg.bf16 = bf16
        name = "bf16" if bf16 else "fp32"
        a, b, c = (measure(fn, repeats, device) for fn in (ours, theirs, ours_sample))
        results[f"sampler_{name}"] = {"ours_ms": a["ms"], "ours_len": a["last"],
                                      "generate_ms": b["ms"], "generate_len": b["last"],
                                      "speedup": b["ms"] / a["ms"], "sample_ms": c["ms"]}
        print(sampler_line(name, results[f"sampler_{name}"]), flush=True)
    cfg.bf16 = False
    gen.train()
    return results


# ----------------------------------------------------------------------------------------------
# Host work per CgT-GAN step (what the GPU waits on), beside a FLOP estimate of the GPU's work

# Effective bf16 throughput of an H100-class GPU on these matmuls, and the paper-scale models:
# non-embedding parameters of GPT-2 124M, RoBERTa-base and CLIP ViT-L/14's text tower, GPT-2's
# tied output layer (768 x 50,257), the mapping network (768 -> 3840 -> 10 x 768), and lengths.
GPU_FLOPS = 400e12
GPT2_BODY, GPT2_HEAD, MAPPING = 85.0e6, 38.6e6, 32.4e6
ROBERTA_BODY, CLIP_TEXT_BODY = 85.0e6, 85.0e6
PREFIX, DISC_TOKENS, CLIP_CONTEXT = 10, 22, 77


def gpu_estimate(b: int, k: int, t: int) -> dict:
    """Milliseconds of GPU work per CgT-GAN step by FLOPs (2 per parameter and token forward, 6
    forward and backward): sampling B*K + B captions of T tokens with a KV cache, the teacher-
    forced pass over the B*K samples, RoBERTa on B*K real + B*K + B generated captions (forward and
    backward), CLIP's text tower on the B*K + B captions."""
    rows = b * k + b
    flops = {
        "sampling (KV cache)": rows * (2 * MAPPING + 2 * GPT2_BODY * PREFIX
                                       + 2 * (GPT2_BODY + GPT2_HEAD) * t),
        "teacher-forced fwd+bwd": b * k * (6 * MAPPING + 6 * (GPT2_BODY + GPT2_HEAD) * (PREFIX + t)),
        "RoBERTa fwd+bwd": (2 * b * k + b) * 6 * ROBERTA_BODY * DISC_TOKENS,
        "CLIP text fwd": rows * 2 * CLIP_TEXT_BODY * CLIP_CONTEXT}
    return {name: 1000 * f / GPU_FLOPS for name, f in flops.items()}


def host_tokenizers(root: Path, sentences: list[str]):
    """GPT-2, RoBERTa and CLIP tokenizers of the released sizes (no models), built once under root."""
    from transformers import GPT2TokenizerFast, RobertaTokenizerFast

    import clip_tokenizer
    from fixtures import full_size_bpe, full_size_clip_merges

    if not (root / "clip_bpe.txt").is_file():
        GPT2TokenizerFast(tokenizer_object=full_size_bpe(50257, [], ["<|endoftext|>"], sentences),
                          bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                          unk_token="<|endoftext|>").save_pretrained(root / "gpt2")
        RobertaTokenizerFast(tokenizer_object=full_size_bpe(
            50265, ["<s>", "<pad>", "</s>", "<unk>"], ["<mask>"], sentences), bos_token="<s>",
            eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>",
            pad_token="<pad>", mask_token="<mask>").save_pretrained(root / "roberta")
        clip_tokenizer.write_merges(root / "clip_bpe.txt", full_size_clip_merges(sentences))
    return (cgtgan.load_tokenizer(root / "gpt2", "GPT-2"),
            cgtgan.load_tokenizer(root / "roberta", "RoBERTa"),
            clip_tokenizer.Tokenizer(root / "clip_bpe.txt"))


def caption_ids(gpt2, sentences: list[str], kind: str, n: int, t: int, end_id: int,
                g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n generated captions (ids (n, T), mask (n, T)) as the generator would give them: "corpus",
    random sentences of the dataset ending at their end token; "random", T random tokens each
    (a random-weight GPT-2's gibberish, the worst case)."""
    if kind == "random":
        return torch.randint(len(gpt2) - 1, (n, t), generator=g), torch.ones(n, t)
    pick = torch.randint(len(sentences), (n,), generator=g).tolist()
    ids, labels = cgtgan.encode_sentences(gpt2, [sentences[i].rstrip(". ") for i in pick], end_id, t)
    return ids, (labels != cgtgan.IGNORE_INDEX).float()  # (n, T), (n, T)


def time_host(gpt2, roberta, clip_tok, sentences: list[str], b: int, k: int, t: int,
              groups: int, repeats: int) -> dict:
    """Median ms of each host piece of one gan_step on new captions at every call, the step's
    code (*) and main's former code alternated on the same inputs: the B*K + B captions' GPT-2
    ids decoded to text, CLIP-tokenised (ClipText's work on strings it has not seen), and the
    discriminator's RoBERTa inputs of B*K real sentences and the captions (cut at 22 tokens); for
    "corpus" and "random" captions. The pieces run on the CPU alone, so their time is host time.
    Then the discriminator's calls with gan.d_groups = groups (time_discriminate)."""
    import clip_tokenizer
    import retokenize
    from types import SimpleNamespace

    end_id = cgtgan.end_token_id(gpt2, ".")
    retokenize.id_map(gpt2, roberta)  # built once per run, before the first step
    run = SimpleNamespace(roberta_tokenizer=roberta, data=SimpleNamespace(corpus=sentences),
                          disc_max_tokens=DISC_TOKENS)
    run.corpus_roberta = runs.Run.corpus_roberta.func(run)  # once per run, as in training
    g = torch.Generator().manual_seed(0)

    def new_inputs(ids, mask, caps, real, index):
        known = train.real_rows(run, index) + retokenize.mapped_rows(roberta, gpt2, ids, mask, end_id)
        return cgtgan.roberta_inputs(roberta, real + caps, DISC_TOKENS, known)
    pieces = {
        "decode GPT-2 ids": lambda ids, mask, caps, real, index: cgtgan.decode_captions(
            gpt2, ids, mask, end_id),
        "CLIP tokenise": lambda ids, mask, caps, real, index: clip_tokenizer.tokenize(
            caps, CLIP_CONTEXT, truncate=True, tokenizer=clip_tok),
        "RoBERTa inputs (lookups)": new_inputs,
        "old: tokenizer.decode": lambda ids, mask, caps, real, index: [
            gpt2.decode(r[:n], clean_up_tokenization_spaces=False)
            for r, n in zip(ids.tolist(), mask.sum(-1).long().tolist())],
        "old: RoBERTa from text": lambda ids, mask, caps, real, index: cgtgan.roberta_inputs(
            roberta, real + caps, DISC_TOKENS)}
    out = {}
    for kind in ("corpus", "random"):
        times = {name: [] for name in pieces}
        for _ in range(repeats + 1):
            ids, mask = caption_ids(gpt2, sentences, kind, b * k + b, t, end_id, g)
            index = torch.randint(len(sentences), (b * k,), generator=g)
            inputs = (ids, mask, cgtgan.decode_captions(gpt2, ids, mask, end_id),
                      [sentences[i] for i in index.tolist()], index)
            for name, fn in pieces.items():
                t0 = time.perf_counter()
                fn(*inputs)
                times[name].append(1000 * (time.perf_counter() - t0))
        out[kind] = {name: statistics.median(ms[1:]) for name, ms in times.items()}
    out["syncs"] = count_syncs(gpt2, b, k, t)
    out["discriminate"] = time_discriminate(gpt2, roberta, sentences, b, k, t, groups, repeats)
    out["gpu_ms"] = gpu_estimate(b, k, t)
    return out


def host_lines(r: dict, b: int, k: int) -> str:
    """The host table beside the GPU estimate."""
    lines = [f"\nhost work per CgT-GAN step (B={b}, K={k}), median ms: corpus / random captions"]
    on_path = ("decode GPT-2 ids", "CLIP tokenise", "RoBERTa inputs (lookups)")
    for name in r["corpus"]:
        mark = "*" if name in on_path else " "
        lines.append(f"  {mark} {name:<26} {r['corpus'][name]:7.1f} {r['random'][name]:7.1f}")
    total = [sum(r[kind][n] for n in on_path) for kind in ("corpus", "random")]
    lines.append(f"    {'total of * (the step)':<26} {total[0]:7.1f} {total[1]:7.1f}")
    lines.append(f"    host syncs in decoding: {r['syncs']} per step (sample + greedy)")
    lines.append(f"discriminate + backward on {2 * b * k + b} rows (12-layer RoBERTa, width 16, "
                 f"CPU arithmetic included; the rows differ by per-call host work), median ms:")
    for name, d in r["discriminate"].items():
        lines.append(f"    {name:<12} gan.d_groups={d['d_groups']:<4} {d['calls']:4d} RoBERTa "
                     f"calls per step {d['ms']:8.1f} ms")
    gpu = r["gpu_ms"]
    lines.append(f"GPU estimate at {GPU_FLOPS / 1e12:.0f} TFLOP/s: " + ", ".join(
        f"{name} {ms:.1f}" for name, ms in gpu.items()) + f"; total {sum(gpu.values()):.1f} ms")
    return "\n".join(lines)


def time_discriminate(gpt2, roberta, sentences: list[str], b: int, k: int, t: int,
                      groups: int, repeats: int) -> dict:
    """Median ms of train.discriminate and the backward of its logits, and its RoBERTa calls, on
    one step's 2BK + B rows (B*K corpus sentences, B*K + B corpus-like captions, their token rows
    known as in gan_step, cut at 22 tokens) with a RoBERTa-base-deep (12 layers) but 16-wide
    discriminator on the CPU: about the same arithmetic in every variant, so their differences
    are the per-call Python and dispatch work, which a GPU cannot overlap when the kernels are
    short. With dropout one group per image (gan.d_groups = B, the former code) and the preset's
    `groups`, and without dropout (one call)."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    cfg = config.DiscriminatorConfig(hidden=16, n_layer=12, n_head=1, max_tokens=DISC_TOKENS)
    disc = cgtgan.build_discriminator(cfg, roberta).train()
    calls = [0]
    disc.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    run = SimpleNamespace(roberta_tokenizer=roberta, discriminator=disc, device=torch.device("cpu"),
                          cfg=SimpleNamespace(disc=cfg), autocast=nullcontext,
                          disc_max_tokens=DISC_TOKENS)
    g, end_id = torch.Generator().manual_seed(1), cgtgan.end_token_id(gpt2, ".")
    ids, mask = caption_ids(gpt2, sentences, "corpus", b * k + b, t, end_id, g)
    real = [sentences[i] for i in torch.randint(len(sentences), (b * k,), generator=g).tolist()]
    texts = real + cgtgan.decode_captions(gpt2, ids, mask, end_id)
    known = roberta(texts)["input_ids"]
    out = {}
    variants = (("per image", b, 0.1), ("groups", groups, 0.1), ("no dropout", 1, 0.0))
    for name, n_groups, p in variants:
        for m in disc.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = p
        group = torch.arange(b) * n_groups // b  # (B,) as train.draw_batch
        group_of_row = torch.cat([group.repeat_interleave(k), group.repeat_interleave(k), group])
        seeds = torch.randint(2**62, (n_groups,), generator=g)
        times = []
        for _ in range(repeats + 1):
            calls[0], t0 = 0, time.perf_counter()
            train.discriminate(run, texts, group_of_row, seeds, known).sum().backward()
            times.append(1000 * (time.perf_counter() - t0))
        out[name] = {"d_groups": n_groups, "calls": calls[0], "ms": statistics.median(times[1:])}
    return out


def count_syncs(gpt2, b: int, k: int, t: int) -> int:
    """Device-to-host synchronisations in one step's decoding (sample + greedy), counted on a tiny
    GPT-2 of the real vocabulary: Tensor.__bool__, item, tolist and nonzero calls."""
    cfg = config.GeneratorConfig(n_embd=32, n_layer=1, n_head=1, max_len=t)
    gen = cgtgan.build_generator(cfg, gpt2, 32).eval()
    count = [0]
    names = ("__bool__", "item", "tolist", "nonzero")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def counted(fn):
        def wrapper(*a, **kw):
            count[0] += 1
            return fn(*a, **kw)
        return wrapper
    try:
        for name in names:
            setattr(torch.Tensor, name, counted(saved[name]))
        feats = torch.randn(b, 32)
        gen.sample(feats, k)
        gen.greedy(feats)
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
    return count[0]


# ----------------------------------------------------------------------------------------------
# Report


def setup_lines(setup: dict) -> str:
    return "\n".join([
        f"{setup['device_name']} | torch {setup['torch']} | transformers {setup['transformers']} | "
        f"{setup['size']}",
        f"B={setup['B']} images x K={setup['K']}, max {setup['T']} tokens, GPT-2 "
        f"{setup['gpt2_params'] / 1e6:.1f}M (V={setup['V']}), RoBERTa "
        f"{setup['roberta_params'] / 1e6:.1f}M, CLIP D={setup['D']}; {setup['train_images']} "
        f"train images, {setup['corpus']} corpus sentences",
        f"build {setup['s_build']:.1f}s, prepare {setup['s_prepare']:.1f}s, load models "
        f"{setup['s_load']:.1f}s",
        f"\nper step, median of {setup['steps']} (after 1 warm-up):"])


def step_line(key: str, r: dict) -> str:
    peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f} GiB"
    line = f"  {key:<10} {r['ms']:9.1f} ms  peak {peak:>9}  "
    if key.startswith("init"):
        return line + f"loss {r['loss']:.3f}"
    return line + (f"(loss_g {r['loss_g']:.3f}, d_loss {r['d_loss']:.3f}, "
                   f"length {r['len']:.1f})")


def sampler_line(name: str, r: dict) -> str:
    return (f"  {name}: ours (token loop) {r['ours_ms']:.1f} ms (mean length {r['ours_len']:.1f}), "
            f"generate(do_sample) {r['generate_ms']:.1f} ms (longest {r['generate_len']}), "
            f"speed-up {r['speedup']:.2f}x; sample (tokens + log-probs) {r['sample_ms']:.1f} ms")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--tiny", action="store_true",
                        help="the fixture's tiny models and B=4, K=2: the code path in seconds")
    parser.add_argument("--workdir", help="keep models, data and caches here (default: a temp dir)")
    parser.add_argument("--batch", type=int, help="B images (default: the preset's 128; tiny 4)")
    parser.add_argument("--k", type=int, help="K samples per image (default: the preset's 5; tiny 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per sampler")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--host-only", action="store_true",
                        help="only the host work per step with real-size tokenizers: no models")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the figures, not per-shard loading bars, go to the log
    preset = config.apply_overrides(config.Config(), config.PRESETS["coco"])
    args.batch = args.batch or (4 if args.tiny else preset.gan.batch)
    args.k = args.k or (2 if args.tiny else preset.gan.k)
    device = data.pick_device(args.device)
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_ps_"))
    root.mkdir(parents=True, exist_ok=True)
    if args.host_only:
        return host_only(root, args, preset.gen.max_len, preset.gan.d_groups)
    try:
        t0 = time.perf_counter()
        options = build_inputs(root, args.tiny, args.batch, device)
        (root / "cli_args.txt").write_text(
            " ".join(f"--set {k}={v}" for k, v in options.items()) + "\n")
        cfg = make_config(options, args)
        t1 = time.perf_counter()
        summary = commands.run_prepare(cfg)
        t2 = time.perf_counter()
        dataset = commands.load_data(cfg)
        parts = runs.build_run(cfg, dataset)
        sync(parts.device)
        t3 = time.perf_counter()
        setup = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
                 else f"CPU ({torch.get_num_threads()} threads)",
                 "torch": torch.__version__, "transformers": _version("transformers"),
                 "size": "tiny models" if args.tiny else "real-sized models, random weights",
                 "B": args.batch, "K": args.k, "T": cfg.gen.max_len, "V": len(parts.gpt2_tokenizer),
                 "D": dataset.train_feats.shape[1], "train_images": len(dataset.train_ids),
                 "corpus": summary["corpus"], "steps": args.steps, "repeats": args.repeats,
                 "gpt2_params": sum(p.numel() for p in parts.generator.gpt.parameters()),
                 "roberta_params": sum(p.numel() for p in parts.discriminator.roberta.parameters()),
                 "s_build": t1 - t0, "s_prepare": t2 - t1, "s_load": t3 - t2}
        # Each figure is printed when measured: a failure later keeps the ones before it.
        print(setup_lines(setup), flush=True)
        steps = time_steps(parts, args.steps)
        print(f"\nsampling {args.batch * args.k} captions, median of {args.repeats}:", flush=True)
        sampler = time_sampler(parts, args.repeats)
        sentences = [s for ss in dataset.splits["test"].references.values() for s in ss]
        host = time_host(parts.gpt2_tokenizer, parts.roberta_tokenizer, parts.clip_text.tokenizer,
                         sentences + dataset.corpus, args.batch, args.k, cfg.gen.max_len,
                         cfg.gan.d_groups, args.repeats)
        print(host_lines(host, args.batch, args.k), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    results = {"setup": setup, **steps, **sampler, "host": host}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


def host_only(root: Path, args, max_len: int, groups: int) -> dict:
    """--host-only: the host table with real-size tokenizers, on the fixture's sentences."""
    fx = build_paperscale_fixture(root / "data", models=False)
    split = json.loads(fx.split_file.read_text())
    sentences = [s["raw"] for e in split["images"] for s in e["sentences"]]
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizers = host_tokenizers(root, sentences)
    host = time_host(*tokenizers, sentences, args.batch, args.k, max_len, groups, args.repeats)
    print(host_lines(host, args.batch, args.k), flush=True)
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host}, indent=2))
    return {"host": host}


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
