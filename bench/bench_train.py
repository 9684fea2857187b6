"""Benchmark of CgT-GAN training: milliseconds per self-critical step and its split, and our
sampler against transformers' `generate(do_sample=True)` on the same model and batch.

    python bench/bench_train.py            # ShapesWorld default config (builds/reuses the world)
    python bench/bench_train.py --steps 20 --threads 2

The generator is the text-only initialisation of runs/shapesworld_seed0 when it exists (real
caption lengths), else a random-weight model (every caption runs to the 20-token cap: worst case).
A third table times one token draw over GPT-2's 50,257-token vocabulary: torch.multinomial (what
`generate` uses), the Gumbel-max trick, and our inverse-CDF draw (cgtgan.sample_categorical).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cgtgan  # noqa: E402
import commands  # noqa: E402
import config  # noqa: E402
import data  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median milliseconds of fn() over repeats (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--run", default="runs/shapesworld_seed0")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config.Config()
    data = commands.load_data(cfg)
    parts = runs.build_run(cfg, data)
    init = Path(args.run) / "init.pt"
    which = "random weights"
    if init.is_file():
        runs.load_checkpoint(init, parts, sections=("gen",))
        which = str(init)
    gen, g = parts.generator, torch.Generator().manual_seed(0)
    B, K = cfg.gan.batch, cfg.gan.k
    print(f"ShapesWorld default: B={B} images x K={K} samples, GPT-2 {cfg.gen.n_layer} layers x "
          f"{cfg.gen.n_embd}, V={len(parts.gpt2_tokenizer)}, generator: {which}, "
          f"torch threads {torch.get_num_threads()}")

    # One full self-critical step as train_gan runs it, and its decoding parts on the same batch.
    opt_g = torch.optim.AdamW(gen.parameters(), lr=cfg.gan.lr)
    opt_d = torch.optim.AdamW(parts.discriminator.parameters(), lr=cfg.gan.d_lr)
    targets = train.agg_targets(parts)
    rows = []
    for step in range(args.steps + 2):
        batch = train.draw_batch(parts, targets, g)
        t0 = time.perf_counter()
        stats = train.gan_step(parts, opt_g, opt_d, batch, cfg.gan.lambda_hold + cfg.gan.lambda_ramp)
        t1 = time.perf_counter()
        gen.sample(batch.feats, K, batch.uniforms)
        t2 = time.perf_counter()
        gen.greedy(batch.feats)
        t3 = time.perf_counter()
        stats.update(ms_total=1000 * (t1 - t0), ms_sample=1000 * (t2 - t1), ms_greedy=1000 * (t3 - t2))
        if step >= 2:  # warm-up steps excluded
            rows.append(stats)
    print(f"\nself-critical step (median of {args.steps}):")
    for key in ("ms_total", "ms_sample", "ms_greedy"):
        print(f"  {key[3:]:>9}: {statistics.median(r[key] for r in rows):8.1f} ms")
    print(f"  mean caption length {statistics.mean(r['len'] for r in rows):.1f} tokens")

    # Our sampler against transformers' generate(do_sample=True): same model, same prefixes.
    feats = data.train_feats[:B].repeat_interleave(K, 0)  # (B*K, D)
    gen.eval()

    def ours():
        with torch.no_grad():
            gen._decode(feats, torch.rand(len(feats), gen.max_len, generator=g))  # tokens only

    def theirs():
        with torch.no_grad():
            gen.gpt.generate(inputs_embeds=gen.mapping(feats), do_sample=True, top_k=0, top_p=1.0,
                             temperature=1.0, max_new_tokens=cfg.gen.max_len,
                             eos_token_id=gen.end_id, pad_token_id=gen.end_id,
                             attention_mask=torch.ones(feats.shape[0], cfg.gen.prefix_len,
                                                       dtype=torch.long))

    repeats = max(5, args.steps // 2)
    t_ours, t_theirs = timed(ours, repeats), timed(theirs, repeats)
    print(f"\nsampling {B * K} captions (max {cfg.gen.max_len} tokens), median of {repeats}:")
    print(f"  ours (KV cache, inverse-CDF draw): {t_ours:8.1f} ms")
    print(f"  transformers generate(do_sample):  {t_theirs:8.1f} ms")
    print(f"  speed-up: {t_theirs / t_ours:.2f}x")

    # The same comparison with GPT-2's 50,257-token vocabulary (same small model otherwise,
    # random weights), where the per-step draw over V dominates as it does at paper scale.
    from transformers import GPT2Config, GPT2LMHeadModel

    big = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=cfg.gen.n_embd,
                                     n_layer=cfg.gen.n_layer, n_head=cfg.gen.n_head)).eval()
    gen_big = cgtgan.CaptionGenerator(gen.mapping, big, end_id=13, max_len=cfg.gen.max_len)

    def ours_big():
        with torch.no_grad():
            gen_big._decode(feats, torch.rand(len(feats), gen_big.max_len, generator=g))

    def theirs_big():
        with torch.no_grad():
            big.generate(inputs_embeds=gen.mapping(feats), do_sample=True, top_k=0, top_p=1.0,
                         temperature=1.0, max_new_tokens=cfg.gen.max_len, eos_token_id=13,
                         pad_token_id=13, attention_mask=torch.ones(feats.shape[0], cfg.gen.prefix_len,
                                                                    dtype=torch.long))

    t_ours, t_theirs = timed(ours_big, repeats), timed(theirs_big, repeats)
    print(f"\nthe same with V=50257 (GPT-2's vocabulary), median of {repeats}:")
    print(f"  ours (KV cache, inverse-CDF draw): {t_ours:8.1f} ms")
    print(f"  transformers generate(do_sample):  {t_theirs:8.1f} ms")
    print(f"  speed-up: {t_theirs / t_ours:.2f}x")

    # One token draw over a GPT-2-sized vocabulary.
    logits = torch.randn(B * K, 50257)
    draws = {
        "torch.multinomial(softmax)": lambda: torch.multinomial(logits.softmax(-1), 1),
        "Gumbel-max argmax": lambda: (logits - torch.empty_like(logits).exponential_().log()).argmax(-1),
        "inverse CDF (ours)": lambda: cgtgan.sample_categorical(logits, torch.rand(len(logits), generator=g)),
    }
    print(f"\none draw for {B * K} rows over V=50257, median of 20:")
    base = None
    for name, fn in draws.items():
        ms = timed(fn, 20)
        base = base or ms
        print(f"  {name:>27}: {ms:7.2f} ms  ({base / ms:.2f}x vs multinomial)")


if __name__ == "__main__":
    main()
