"""ShapesWorld build benchmark: time of each build step, the tiny CLIP's retrieval accuracy and
modality gap, and the nearest-corpus-sentence retrieval baseline on the test split.

    python bench/bench_shapes.py              # build the default world from nothing (temp dir)
    python bench/bench_shapes.py --reuse      # reuse (or build) the default cache under cache/
    python bench/bench_shapes.py --world corpus_style=alt
    python bench/bench_shapes.py --step-threads 1 2 --busy 1   # CLIP step time by thread count
    python bench/bench_shapes.py --step-procs 1 2 --busy 0 --steps 40  # ... by process count

The retrieval baseline (CLIPRe-like) captions each test image with the corpus sentence of highest
CLIP cosine; its peer in the same run is a random corpus sentence per image (the ratio shows what
CLIP's ranking adds). CLIP retrieval is compared with chance on the same held-out pairs.

--step-threads times tiny-CLIP pretraining steps (the default model and batch, on a few hundred
pairs) at each thread count, --step-procs on each number of one-thread processes sharing each step
(world.clip_procs), while --busy busy-loop processes compete for the cores, as another training
or test job does (ShapesWorldConfig.threads).
"""
import argparse
import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clip_model  # noqa: E402
import config  # noqa: E402
import clip_tokenizer  # noqa: E402
import evaluate  # noqa: E402
import shapes_clip  # noqa: E402
import shapesworld as sw  # noqa: E402


def clip_step_seconds(cfg: sw.ShapesWorldConfig, settings: list[tuple[int, int]], busy: int,
                      steps: int, repeats: int) -> dict[tuple[int, int], list[float]]:
    """Seconds per tiny-CLIP pretraining step for each (processes, threads each), measured in
    turns, with `busy` busy-loop processes running beside this one the whole time. With several
    processes the time includes starting them (world.clip_procs)."""
    pairs = shapes_clip.clip_pairs(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        bpe = Path(tmp) / "bpe.txt"
        clip_tokenizer.write_merges(bpe, sw.learn_bpe([c for caps in pairs[1] for c in caps]))
        tokenizer = clip_tokenizer.Tokenizer(bpe)
    images, tokens, closeup, _ = shapes_clip.pretraining_inputs(cfg, pairs, tokenizer, False)
    short = dataclasses.replace(cfg, clip_steps=steps)
    competitors = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                   for _ in range(busy)]
    seconds: dict[tuple[int, int], list[float]] = {setting: [] for setting in settings}
    try:
        for _ in range(repeats):
            for procs, threads in settings:
                with sw.cpu_threads(threads):
                    start = time.perf_counter()
                    shapes_clip.pretrain_clip(dataclasses.replace(short, clip_procs=procs,
                                                                  threads=threads),
                                              images, tokens, tokenizer.vocab_size, False, closeup)
                    seconds[procs, threads].append((time.perf_counter() - start) / steps)
    finally:
        for process in competitors:
            process.kill()
            process.wait()
    return seconds


def print_step_times(settings: list[tuple[int, int]], busy: int, steps: int, repeats: int) -> None:
    cfg = sw.ShapesWorldConfig(n_clip_pairs=512, n_clip_heldout=1, n_clip_closeups=256)
    seconds = clip_step_seconds(cfg, settings, busy, steps, repeats)
    print(f"tiny-CLIP pretraining step (batch {cfg.clip_batch_size}, {steps} steps x {repeats}), "
          f"{busy} busy-loop process(es) beside it:")
    for (procs, threads), runs in seconds.items():
        print(f"  {procs} process(es) x {threads} thread(s): {statistics.median(runs):.3f} s/step "
              f"(median; runs {', '.join(f'{t:.3f}' for t in runs)})")


def print_build(report: dict, total: float, data) -> None:
    """The build's step times, the tiny CLIP's figures, and the retrieval baseline on the test split
    of data (a data.CaptionData)."""
    print(f"torch threads: {report['threads']} (world.threads)")
    print(f"build: {total:.1f} s total" + ("" if report["timings_s"] else " (all parts reused)"))
    print(f"  {'step':<12s} {'wall s':>7s} {'CPU s':>7s}   (CPU s / threads ~ wall time on idle cores)")
    for name, seconds in report["timings_s"].items():
        print(f"  {name:<12s} {seconds:7.1f} {report['cpu_s'][name]:7.1f}")
    if report["timings_s"]:
        print(f"  {'total':<12s} {sum(report['timings_s'].values()):7.1f} "
              f"{sum(report['cpu_s'].values()):7.1f}")
    c = report["clip"]
    print(f"tiny CLIP, image->text on {c['n']} held-out pairs: R@1 {c['r1']:.3f}  R@5 {c['r5']:.3f}"
          f"  (chance R@1 {c['chance_r1']:.4f}, ratio {c['r1'] / c['chance_r1']:.0f}x)")
    print(f"one object, zero-shot over \"a {{colour}} {{shape}}\": shape {c['shape_acc']:.1%} (chance "
          f"{1 / 6:.1%}), colour {c['colour_acc']:.1%} (chance {1 / 8:.1%})")
    print(f"shape of an object inside a held-out scene (its colour given): {c['scene_shape_acc']:.1%} "
          f"(chance {1 / 6:.1%})")
    if "scene_size_acc" in c:  # worlds built before it was measured lack it
        print(f"size over \"a {{size}} {{colour}} {{shape}}\": one object {c['size_acc']:.1%}, inside a "
              f"scene {c['scene_size_acc']:.1%} (chance {1 / 3:.1%})")
    print(f"modality gap: cos(mean image, mean text) {c['gap_cos']:.3f}; matched-pair cosine "
          f"{c['matched_cos']:.3f}; |mean image| {c['mean_image_norm']:.3f}, "
          f"|mean text| {c['mean_text_norm']:.3f}")
    print(f"test references found verbatim in the corpus: {report['test_refs_in_corpus']:.1%}")

    test = data.splits["test"]
    nearest = (test.feats @ data.corpus_feats.T).argmax(dim=1)  # (n,)
    gen = torch.Generator().manual_seed(0)
    random_pick = torch.randint(len(data.corpus), (len(test.ids),), generator=gen)  # (n,)
    rows = {}
    for name, picks in (("nearest corpus sentence", nearest), ("random corpus sentence", random_pick)):
        captions = {i: data.corpus[j] for i, j in zip(test.ids, picks.tolist())}
        scores = evaluate.score(captions, test.references)
        rows[name] = (scores["CIDEr-D"], scores["BLEU-4"], data.check(captions, "test"))
    print(f"test split ({len(test.ids)} images), corpus of {len(data.corpus)} sentences:")
    for name, (cider, bleu, checked) in rows.items():
        print(f"  {name:<24s} CIDEr-D {100 * cider:6.1f}  BLEU-4 {100 * bleu:5.1f}  "
              f"fluency {checked['fluency']:.3f}  faithfulness {checked['faithfulness']:.3f}")
    ratio = rows["nearest corpus sentence"][0] / max(rows["random corpus sentence"][0], 1e-9)
    print(f"  retrieval / random CIDEr-D ratio: {ratio:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reuse", action="store_true", help="use the default cache directory")
    parser.add_argument("--world", nargs="*", default=[], help="ShapesWorldConfig FIELD=VALUE")
    parser.add_argument("--step-threads", nargs="*", type=int, default=[],
                        help="time CLIP pretraining steps at these thread counts instead")
    parser.add_argument("--step-procs", nargs="*", type=int, default=[],
                        help="time CLIP pretraining steps on these process counts, 1 thread each")
    parser.add_argument("--busy", type=int, default=1,
                        help="busy-loop processes beside --step-threads / --step-procs")
    parser.add_argument("--steps", type=int, default=20,
                        help="steps per --step-threads measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per thread count")
    args = parser.parse_args()
    if args.step_threads or args.step_procs:
        print_step_times([(1, n) for n in args.step_threads] + [(p, 1) for p in args.step_procs],
                         args.busy, args.steps, args.repeats)
        return
    # World settings go through the project's one parser, typed and checked like `--set world.*`.
    overrides = config.parse_sets([f"world.{item}" for item in args.world])
    with tempfile.TemporaryDirectory() as tmp:
        if not args.reuse:
            overrides.setdefault("world.root", tmp)
        cfg = config.apply_overrides(config.Config(), overrides).world
        start = time.perf_counter()
        data = sw.build_shapesworld(cfg)
        total = time.perf_counter() - start
        report = sw.load_report(cfg)
    print_build(report, total, data)


if __name__ == "__main__":
    main()
