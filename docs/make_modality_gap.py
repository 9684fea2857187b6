"""Draws docs/modality_gap.png: the modality gap of a trained run, before and after CgT-GAN.

    python docs/make_modality_gap.py [RUN_DIR] [OUT.png]     # default runs/shapesworld_seed0

For the run's test images it puts four sets of CLIP embeddings of the same scenes in one 2-D
picture (figures.draw_modality_gap): the image embeddings, the text embeddings of each image's
first reference caption, of the text-only initialisation's greedy captions (init.pt: a captioner
trained on text embeddings only, Sec. 3.1) and of the CgT-GAN generator's (best.pt, Sec. 3.4),
with each set's mean image-text cosine and the distance between the clouds' centres.
CLIP's image and text embeddings of the same scene sit apart (the modality gap); CgT-GAN's
captions are trained on the images' own CLIP rewards. Prints the numbers it draws.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cli  # noqa: E402  (after the path is set)
import commands  # noqa: E402
import figures  # noqa: E402
import runs  # noqa: E402
import train  # noqa: E402

OUT = ROOT / "docs/modality_gap.png"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_dir = Path(argv[0]) if argv else ROOT / "runs/shapesworld_seed0"
    out = Path(argv[1]) if len(argv) > 1 else OUT
    cfg, run_dir = cli.run_config(str(run_dir))
    data = commands.load_data(cfg)
    run = runs.build_run(cfg, data)
    test = data.splits["test"]
    texts = {"reference captions": run.clip_text([test.references[i][0] for i in test.ids])}
    for label, checkpoint in (("text-only init's captions", "init.pt"),
                              ("CgT-GAN's captions", "best.pt")):
        runs.load_checkpoint(run_dir / checkpoint, run, sections=("gen",))
        _, captions = train.evaluate_generator(run, "test")
        texts[label] = run.clip_text(captions)  # (N, D)
    title = f"CLIP embeddings of the {len(test.ids)} ShapesWorld test scenes ({run_dir.name})"
    numbers = figures.draw_modality_gap(test.feats, texts, out, title)
    for label, n in numbers.items():
        print(f"{label}: mean cos(image, text) {n['cos']:.3f}, gap {n['gap']:.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
