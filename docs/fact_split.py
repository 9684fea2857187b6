"""Faithfulness split by fact kind for a ShapesWorld run: the greedy test captions of its init.pt
and best.pt, each claim checked against its scene (shapes_grammar.fact_split), then each size
word it writes (shapes_grammar.size_claims). It shows which claims keep faithfulness down
(docs/shapesworld_results.md, findings 10 and 11: sizes).

    python docs/fact_split.py runs/shapesworld_seed0
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import commands  # noqa: E402
import config  # noqa: E402
import runs  # noqa: E402
import shapes_grammar as grammar  # noqa: E402
import shapesworld as sw  # noqa: E402
import train  # noqa: E402


def open_run(script: str) -> tuple[Path, runs.Run, dict]:
    """The run folder named on the command line, its Run (on 1 thread) and its test scenes by
    image id; a one-line usage message when sys.argv names no run folder."""
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "config.json").is_file():
        sys.exit(f"usage: python docs/{script} RUN_DIR (a ShapesWorld run folder with config.json)")
    torch.set_num_threads(1)
    run_dir = Path(sys.argv[1])
    cfg = config.config_from_dict(json.loads((run_dir / "config.json").read_text()))
    run = runs.build_run(cfg, commands.load_data(cfg))
    world = json.loads((sw.world_dir(cfg.world) / "world.json").read_text())
    scenes = {f"test_{i:05d}": grammar.scene_from_json(s)
              for i, s in enumerate(world["scenes"]["test"])}
    return run_dir, run, scenes


def main() -> None:
    run_dir, run, scenes = open_run("fact_split.py")
    for checkpoint in ("init", "best"):
        if not (run_dir / f"{checkpoint}.pt").is_file():
            continue
        runs.load_checkpoint(run_dir / f"{checkpoint}.pt", run, sections=("gen",))
        _, captions = train.evaluate_generator(run, "test")
        split = grammar.fact_split(dict(zip(run.data.splits["test"].ids, captions)), scenes)
        print(f"{checkpoint}.pt: " + ", ".join(f"{kind} {true}/{claimed} ({true / claimed:.0%})"
                                                for kind, (true, claimed) in split.items()))
        sizes = grammar.size_claims(dict(zip(run.data.splits["test"].ids, captions)), scenes)
        print("  size words: " + "; ".join(
            f"{size} {sum(v.values())} (" + ", ".join(f"{k} {n}" for k, n in sorted(v.items())) + ")"
            for size, v in sizes.items()))


if __name__ == "__main__":
    main()
