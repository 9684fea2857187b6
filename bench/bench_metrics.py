"""Speed of evaluate.py's metrics against pycocoevalcap 1.2 on the same tokens, and a score check.

    python bench/bench_metrics.py [--images 5000] [--refs 5] [--runs 5] [--seed 0]

Builds a seeded set of COCO-sized captions (5,000 images x 5 references, 8-14 words from a
2,000-word Zipf vocabulary, candidates sharing words with their references), feeds both
implementations the same space-joined tokens, times each metric `--runs` times (alternating ours
and the toolkit's, as the machine may be shared) and prints the medians, the ratios (toolkit time /
ours) and the largest score differences (corpus and per image).
"""
import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402


def make_data(images, refs, seed):
    """{id: tokens} candidates and {id: [tokens]} references with realistic overlap."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(2000)]
    weights = [1 / (i + 1) for i in range(len(vocab))]

    def sentence():
        return rng.choices(vocab, weights, k=rng.randint(8, 14))

    cands, references = {}, {}
    for i in range(images):
        references[i] = [sentence() for _ in range(refs)]
        base = rng.choice(references[i])
        cands[i] = [w if rng.random() < 0.6 else rng.choices(vocab, weights)[0] for w in base[:rng.randint(7, 13)]]
    return cands, references


def timed_pair(ours_fn, toolkit_fn, runs):
    """Median seconds of both functions over `runs` rounds, alternating them so that the load of a
    shared machine hits both alike; returns (t_ours, t_toolkit, ours result, toolkit result)."""
    times = ([], [])
    results = [None, None]
    for _ in range(runs):
        for side, fn in enumerate((ours_fn, toolkit_fn)):
            gc.collect()
            start = time.perf_counter()
            results[side] = fn()
            times[side].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1]), results[0], results[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--refs", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    cands, refs = make_data(args.images, args.refs, args.seed)
    ids = list(cands)
    c_list, r_list = [cands[i] for i in ids], [refs[i] for i in ids]
    res = {i: [" ".join(cands[i])] for i in ids}
    gts = {i: [" ".join(r) for r in refs[i]] for i in ids}

    rows = [
        ("CIDEr-D", lambda: evaluate.cider_d(c_list, r_list), lambda: Cider().compute_score(gts, res),
         lambda o, t: [o[0]] + o[1], lambda t: [t[0]] + list(t[1])),
        ("BLEU-1..4", lambda: evaluate.bleu(c_list, r_list), lambda: Bleu(4).compute_score(gts, res, verbose=0),
         lambda o, t: o[0] + o[1][3], lambda t: t[0] + t[1][3]),
        ("ROUGE-L", lambda: [evaluate.rouge_l(c, r) for c, r in zip(c_list, r_list)],
         lambda: Rouge().compute_score(gts, res), lambda o, t: o, lambda t: list(t[1])),
    ]
    print(f"{args.images} images x {args.refs} references, median of {args.runs} runs (seconds)")
    print(f"{'metric':<10} {'ours':>8} {'toolkit':>8} {'speed-up':>9} {'max |diff|':>11}")
    for name, ours_fn, toolkit_fn, ours_vals, toolkit_vals in rows:
        t_ours, t_kit, ours, kit = timed_pair(ours_fn, toolkit_fn, args.runs)
        diff = max(abs(a - b) for a, b in zip(ours_vals(ours, kit), toolkit_vals(kit)))
        print(f"{name:<10} {t_ours:8.3f} {t_kit:8.3f} {t_kit / t_ours:8.1f}x {diff:11.1e}")
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        evaluate.score_tokens(cands, refs)
        times.append(time.perf_counter() - start)
    print(f"evaluate.score_tokens (all metrics, per image): {statistics.median(times):.3f} s")


if __name__ == "__main__":
    main()
