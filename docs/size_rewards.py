"""Does a run's reward prefer the true size? For every object of the test scenes, the four
captions of shapes_grammar.size_variants ("a small red circle", "a medium ...", "a large ...",
"a red circle") are scored against the image by CLIP-cos and by CLIP-agg (the run's temperature),
as a CgT-GAN step scores its samples. Prints, per reward, how often the best-scored size is the
object's own, which size it picks, and the mean reward of each variant (docs/shapesworld_results.md,
finding 11).

    python docs/size_rewards.py runs/shapesworld_seed0
"""
import collections
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402

import cgtgan  # noqa: E402
import shapes_grammar as grammar  # noqa: E402
from fact_split import open_run  # noqa: E402


def main() -> None:
    _, run, by_id = open_run("size_rewards.py")
    cfg, scenes = run.cfg, [by_id[i] for i in run.data.splits["test"].ids]
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
