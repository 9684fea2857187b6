"""ShapesWorld build benchmark: time of each build step, the tiny CLIP's retrieval accuracy and
modality gap, and the nearest-corpus-sentence retrieval baseline on the test split.

    python bench/bench_shapes.py              # build the default world from nothing (temp dir)
    python bench/bench_shapes.py --reuse      # reuse (or build) the default cache under cache/
    python bench/bench_shapes.py --world corpus_style=alt

The retrieval baseline (CLIPRe-like) captions each test image with the corpus sentence of highest
CLIP cosine; its peer in the same run is a random corpus sentence per image (the ratio shows what
CLIP's ranking adds). CLIP retrieval is compared with chance on the same held-out pairs.
"""
import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evaluate  # noqa: E402
import shapesworld as sw  # noqa: E402


def parse_overrides(items: list[str]) -> dict:
    """["n_train=100", "corpus_style=alt"] -> typed ShapesWorldConfig overrides."""
    fields = {f.name: f for f in dataclasses.fields(sw.ShapesWorldConfig)}
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in fields:
            raise SystemExit(f"unknown ShapesWorldConfig field {name!r}; one of {sorted(fields)}")
        kind = type(getattr(sw.ShapesWorldConfig(), name))
        if name == "root" or kind is str:
            out[name] = value
        elif kind is bool:
            out[name] = value.lower() in ("1", "true")
        else:
            out[name] = kind(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reuse", action="store_true", help="use the default cache directory")
    parser.add_argument("--world", nargs="*", default=[], help="ShapesWorldConfig FIELD=VALUE")
    args = parser.parse_args()
    overrides = parse_overrides(args.world)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.reuse:
            overrides.setdefault("root", tmp)
        cfg = sw.ShapesWorldConfig(**overrides)
        start = time.perf_counter()
        data = sw.build_shapesworld(cfg)
        total = time.perf_counter() - start
        report = sw.load_report(cfg)
    print(f"torch threads: {torch.get_num_threads()}")
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


if __name__ == "__main__":
    main()
