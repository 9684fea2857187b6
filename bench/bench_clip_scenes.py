"""The tiny CLIP's reading of shapes inside scenes, for pretraining variants (docs/shapesworld_results.md,
finding 9): pretrains a tiny CLIP from scratch on the world's pairs and probes it as report.json does.

    python bench/bench_clip_scenes.py                                   # the default pretraining
    python bench/bench_clip_scenes.py --world clip_heads=8              # 8 attention-pool heads
    python bench/bench_clip_scenes.py --world clip_heads=8 clip_swaps=1 clip_swap_captions=0.7

Prints R@1 on the held-out pairs, the zero-shot shape and colour probe (shape_acc, colour_acc,
scene_shape_acc: the scene image against "a {colour} {shape}" over the six shapes), and beside it a
linear probe: one 6-way classifier per colour trained on 8,000 pretraining scenes' image
embeddings, tested on the held-out scenes' objects that scene_shape_acc counts. The linear probe
says what the embedding holds; the zero-shot probe what CLIP's text finds there.

world.clip_swaps S makes a share S of every batch's pairs "swap twins" (shapes_clip.swap_twin): a
pretraining scene beside its twin in which two objects of different shapes and colours trade
shapes, drawn with the same background and noise, so only which colour goes with which shape
tells them apart; world.clip_swap_captions P captions a share P of those pairs by the changed
object alone ("a red star" against "a red circle"). Each run takes a few minutes on one thread;
the world's scenes and captions are the default world's (its CLIP BPE too, when the default world
is cached).
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import clip_tokenizer  # noqa: E402
import config  # noqa: E402
import shapes_clip  # noqa: E402
import shapes_grammar as grammar  # noqa: E402
import shapesworld as sw  # noqa: E402

def linear_probe(train_feats, train_scenes, test_feats, test_scenes, steps: int = 500) -> float:
    """Share of the test scenes' objects (those whose colour is unique in their scene) whose shape a
    per-colour linear classifier on the scene's image embedding names right."""
    def objects(feats, scenes):
        rows = [(f, list(grammar.COLOURS).index(o.colour), grammar.SHAPES.index(o.shape))
                for f, s in zip(feats, scenes) for o in s
                if sum(other.colour == o.colour for other in s) == 1]
        f, c, s = zip(*rows)
        return torch.stack(f) * 10, torch.tensor(c), torch.tensor(s)

    x, colour, shape = objects(train_feats, train_scenes)
    w = torch.zeros(len(grammar.COLOURS), x.shape[1], len(grammar.SHAPES), requires_grad=True)
    b = torch.zeros(len(grammar.COLOURS), len(grammar.SHAPES), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(torch.einsum("nd,nds->ns", x, w[colour]) + b[colour], shape)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, colour, shape = objects(test_feats, test_scenes)
    with torch.no_grad():
        guess = (torch.einsum("nd,nds->ns", x, w[colour]) + b[colour]).argmax(1)
    return (guess == shape).float().mean().item()


def clip_tokenizer_for(cfg) -> clip_tokenizer.Tokenizer:
    """The cached default world's CLIP BPE, else one learned here from the pairs' captions."""
    cached = sw.world_dir(sw.ShapesWorldConfig()) / "tokenizers" / "clip_bpe.txt"
    if cached.is_file():
        return clip_tokenizer.Tokenizer(cached)
    bpe = Path(tempfile.mkdtemp()) / "bpe.txt"
    clip_tokenizer.write_merges(bpe, sw.learn_bpe([c for caps in shapes_clip.clip_pairs(cfg)[1]
                                                   for c in caps]))
    return clip_tokenizer.Tokenizer(bpe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", nargs="*", default=[], help="ShapesWorldConfig FIELD=VALUE")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config.apply_overrides(config.Config(), config.parse_sets(
        [f"world.{item}" for item in args.world])).world
    tokenizer = clip_tokenizer_for(cfg)
    pairs = shapes_clip.clip_pairs(cfg)
    progress = sys.stderr.isatty()  # bars on a terminal, none in a log file
    images, tokens, closeup, twins = shapes_clip.pretraining_inputs(cfg, pairs, tokenizer, progress)
    n, (scenes, captions) = cfg.n_clip_pairs, pairs
    start = time.perf_counter()
    model, _ = shapes_clip.pretrain_clip(cfg, images[:n], tokens[:n], tokenizer.vocab_size, progress,
                                         closeup, twins)
    seconds = time.perf_counter() - start
    held_feats = shapes_clip.encode_images(model, images[n:])
    held = [caps[0] for caps in captions[n:]]
    m = shapes_clip.retrieval_and_gap(held_feats, shapes_clip.encode_texts(model, tokenizer, held), held)
    m.update(shapes_clip.shape_and_colour_accuracy(model, tokenizer, cfg, scenes[n:], held_feats))
    probe = linear_probe(shapes_clip.encode_images(model, images[:8000]), scenes[:8000], held_feats,
                         scenes[n:])
    print(f"world {' '.join(args.world) or '(defaults)'}; {cfg.clip_steps} steps in {seconds:.0f} s "
          f"on {args.threads} thread(s)")
    print(f"  R@1 {m['r1']:.3f}  shape_acc {m['shape_acc']:.1%}  colour_acc {m['colour_acc']:.1%}  "
          f"scene_shape_acc {m['scene_shape_acc']:.1%}  size_acc {m['size_acc']:.1%}  "
          f"scene_size_acc {m['scene_size_acc']:.1%}  linear probe in scenes {probe:.1%}")


if __name__ == "__main__":
    main()
