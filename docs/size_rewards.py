"""Does a run's reward prefer the true size? For every object of the test scenes, the four
captions of shapes_grammar.size_variants ("a small red circle", "a medium ...", "a large ...",
"a red circle") are scored against the image by CLIP-cos and by CLIP-agg (the run's temperature),
as a CgT-GAN step scores its samples. Prints, per reward, how often the best-scored size is the
object's own, which size it picks, and the mean reward of each variant (docs/shapesworld_results.md,
finding 11).

    python docs/size_rewards.py runs/shapesworld_seed0
"""
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cgtgan  # noqa: E402
import commands  # noqa: E402
import config  # noqa: E402
import runs  # noqa: E402
import shapes_grammar as grammar  # noqa: E402
import shapesworld as sw  # noqa: E402


def main() -> None:
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "config.json").is_file():
        sys.exit("usage: python docs/size_rewards.py RUN_DIR (a ShapesWorld run folder with config.json)")
    torch.set_num_threads(1)
    cfg = config.config_from_dict(json.loads((Path(sys.argv[1]) / "config.json").read_text()))
    run = runs.build_run(cfg, commands.load_data(cfg))
    world = json.loads((sw.world_dir(cfg.world) / "world.json").read_text())
    scenes = [grammar.scene_from_json(s) for s in world["scenes"]["test"]]
    feats = run.data.splits["test"].feats  # (n, D)
    corpus = run.data.corpus_feats
    if cfg.gan.agg_raw:
        corpus = corpus * run.data.corpus_norms[:, None]
    agg = cgtgan.clip_agg_target(feats, corpus, cfg.gan.temperature, raw=cfg.gan.agg_raw)  # (n, D)
    owner = torch.tensor([i for i, scene in enumerate(scenes) for _ in scene])  # (objects,)
    truth = [o.size for scene in scenes for o in scene]
    texts = [c for scene in scenes for variants in grammar.size_variants(scene) for c in variants]
    emb = run.clip_text(texts).view(len(truth), len(grammar.SIZES) + 1, -1)  # (objects, 4, D)
    options = [*grammar.SIZES, "none"]
    for name, reward in (("CLIP-cos", cgtgan.clip_cos_reward(feats[owner], emb)),
                         ("CLIP-agg", cgtgan.clip_agg_reward(agg[owner], emb, raw=cfg.gan.agg_raw))):
        picks = [grammar.SIZES[i] for i in reward[:, :3].argmax(1).tolist()]
        right = sum(p == t for p, t in zip(picks, truth)) / len(truth)
        print(f"{name}: best size is the true one for {right:.0%} of {len(truth)} objects "
              f"(chance 33%); picks {dict(sorted(collections.Counter(picks).items()))}; mean reward "
              + ", ".join(f"{o} {r:.2f}" for o, r in zip(options, reward.mean(0).tolist())))


if __name__ == "__main__":
    main()
