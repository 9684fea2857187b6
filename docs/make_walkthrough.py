"""Writes docs/walkthrough.md: one CgT-GAN step on ShapesWorld, tensor by tensor.

    python docs/make_walkthrough.py [OUT.md]

It builds a tiny ShapesWorld in a temporary folder (a few seconds: small splits, a one-layer CLIP
pretrained for a few steps), gives the generator a short text-only initialisation (Sec. 3.1),
then runs ONE step of `train.gan_step`, the function `python cgtgan.py train` runs (Sec. 3.2-3.4),
and records every tensor the step computes on its way: the step's own calls are observed (each
function train.py calls is wrapped by a recorder that passes its arguments and result through
unchanged, and forward hooks read the mapping network's prefix), never recomputed beside it.
Each stage is listed with the paper's equation, each tensor with its shape and first values.
tests/test_docs.py regenerates the page and fails when the committed one is stale.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  (after the path is set)
import transformers  # noqa: E402

import runs  # noqa: E402
import train  # noqa: E402
from config import Config, apply_overrides  # noqa: E402
from shapesworld import build_shapesworld  # noqa: E402

OUT = ROOT / "docs/walkthrough.md"
WORLD = dict(n_clip_pairs=300, n_clip_heldout=60, n_clip_closeups=60, n_train=40, n_corpus=600,
             n_val=8, n_test=12, clip_steps=20, clip_batch_size=32, clip_vision_layers=1,
             clip_text_layers=1, clip_embed_dim=32, bpe_vocab_size=300)
SETTINGS = {"gen.n_layer": 1, "gen.n_embd": 32, "gen.n_head": 2, "gen.prefix_len": 2,
            "gen.max_len": 8, "disc.n_layer": 1, "disc.hidden": 32, "disc.n_head": 2,
            "init.steps": 300, "init.batch": 16, "gan.batch": 2, "gan.k": 3, "gan.lambda_hold": 0,
            "gan.lambda_ramp": 0, "threads": 1}
# The functions gan_step calls by name in train.py, in the order the page explains them.
RECORDED = ("decode_captions", "clip_cos_reward", "clip_agg_reward", "semantic_reward",
            "discriminate", "naturalness_reward", "discriminator_loss", "update",
            "reward_lambda", "generator_loss")


# ----------------------------------------------------------------------------------------------
# Running one step and recording it


def build(root: Path) -> tuple[runs.Run, train.Batch]:
    """A tiny ShapesWorld, its run after a short text-only initialisation, and one batch."""
    cfg = apply_overrides(Config(), {**SETTINGS, **{f"world.{k}": v for k, v in WORLD.items()},
                                     "world.root": str(root / "world"), "runs_dir": str(root)})
    data = build_shapesworld(cfg.world, progress=False)
    run = runs.build_run(cfg, data)
    train.train_init(run, root, log=lambda record: None)
    targets = train.agg_targets(run)  # (N, D)
    batch = train.draw_batch(run, targets, torch.Generator().manual_seed(cfg.seed + 1))
    return run, batch


def record_step(run: runs.Run, batch: train.Batch) -> tuple[dict, dict]:
    """Runs train.gan_step once -> ({function: [(args, result), ...]}, {tensor name: tensor}):
    the calls gan_step made, and the prefix, sampled ids and weights before and after."""
    calls, seen, originals = {name: [] for name in RECORDED}, {}, {}

    def recorder(name, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            calls[name].append((args, out))
            return out
        return wrapped

    for name in RECORDED:
        originals[name] = getattr(train, name)
        setattr(train, name, recorder(name, originals[name]))
    gen, disc = run.generator, run.discriminator

    def keep_prefix(module, args, out) -> None:  # a hook that returns None leaves the output
        seen.setdefault("prefix", out.detach().clone())

    hook = gen.mapping.register_forward_hook(keep_prefix)
    sample = gen.sample
    gen.sample = lambda *a, **k: seen.setdefault("sample", sample(*a, **k))
    seen["W1 before"] = gen.mapping.model[0].weight.detach().clone()
    seen["D head before"] = disc.head[-1].weight.detach().clone()
    cfg = run.cfg.gan
    opt_g = train.adamw(gen, cfg.lr, cfg.weight_decay, cfg.no_decay)
    opt_d = train.adamw(disc, cfg.d_lr, cfg.weight_decay, cfg.no_decay)
    try:
        seen["stats"] = train.gan_step(run, opt_g, opt_d, batch, step=0)
    finally:
        hook.remove()
        del gen.sample
        for name, fn in originals.items():
            setattr(train, name, fn)
    seen["W1 grad"] = gen.mapping.model[0].weight.grad.detach().clone()
    seen["W1 after"] = gen.mapping.model[0].weight.detach().clone()
    seen["D head after"] = disc.head[-1].weight.detach().clone()
    return calls, seen


# ----------------------------------------------------------------------------------------------
# The page


def values(x, n: int = 4) -> str:
    """A tensor's shape and its first n values (flattened), 4 significant digits."""
    x = torch.as_tensor(x).detach().float()
    first = ", ".join(f"{v:.4g}" for v in x.flatten()[:n].tolist())
    more = ", ..." if x.numel() > n else ""
    return f"`{tuple(x.shape)}` | {first}{more}"


def table(rows: list[tuple[str, object]]) -> list[str]:
    return ["| tensor | shape | first values |", "|---|---|---|",
            *[f"| `{name}` | {values(x)} |" for name, x in rows], ""]


def stage(title: str, equation: str, code: str, rows: list[tuple[str, object]]) -> list[str]:
    return [f"### {title}", "", f"Paper: {equation}", "", f"Code: {code}", "", *table(rows)]


def page(run: runs.Run, batch: train.Batch, calls: dict, seen: dict) -> str:
    """The markdown of the walkthrough."""
    b, k = batch.feats.shape[0], run.cfg.gan.k
    ids, logp, mask = seen["sample"]
    (_, texts), = calls["decode_captions"]  # the B*K samples, then the B greedy captions
    captions, greedy = texts[:b * k], texts[b * k:]
    (cos_args, r_cos), = calls["clip_cos_reward"]
    (_, r_agg), = calls["clip_agg_reward"]
    (_, r_sem), = calls["semantic_reward"]
    (_, d_all), = calls["discriminate"]
    (_, r_nat), = calls["naturalness_reward"]
    (d_args, (d_loss, _)), = calls["discriminator_loss"]
    (_, lam), = calls["reward_lambda"]
    (_, (g_loss, g_stats)), = calls["generator_loss"]
    stats = seen["stats"]
    out = [
        "# One CgT-GAN step, tensor by tensor",
        "",
        "Generated by `python docs/make_walkthrough.py` from one real call of `train.gan_step` "
        "(tests/test_docs.py fails when this page is stale). The world is a tiny ShapesWorld "
        f"({len(run.data.train_ids)} training images, {len(run.data.corpus)} corpus sentences, "
        "a CLIP pretrained for a few steps) and the generator had a short text-only "
        f"initialisation, so the captions are poor; the shapes are those of any run: B = {b} "
        f"images, K = {k} samples each, T tokens, P = {run.cfg.gen.prefix_len} prefix vectors, "
        f"D = {batch.feats.shape[1]} CLIP width, E = {run.cfg.gen.n_embd} GPT-2 width. Values "
        f"from transformers {transformers.__version__} (another version initialises the models "
        "otherwise, and every value after the first layer differs).",
        "",
        "## Sec. 3.1: from the image embedding to K sampled captions",
        "",
        *stage("Image embedding", "v = E_I(I), the frozen CLIP image encoder (unit rows)",
               "`train.draw_batch` (precomputed by the world)", [("batch.feats (v)", batch.feats)]),
        *stage("Visual prompt", "prefix = MLP(v) reshaped to P vectors of GPT-2's width",
               "`cgtgan.MappingNetwork` (called inside `CaptionGenerator.sample`)",
               [("prefix", seen["prefix"][:b * k:k])]),
        *stage("Sampled captions", "c_bk ~ p(c | v_b) = prod_t p(w_t | prefix, w_<t), and "
               "log p(w_t) through one teacher-forced pass (`prefix_lm_logits`)",
               "`CaptionGenerator.sample` -> ids, logp, mask", [("ids", ids), ("logp", logp),
                                                               ("mask", mask)]),
        "Decoded (`decode_captions`): " + "; ".join(f"`{c}`" for c in captions[:k]) + " (image 0's"
        " samples); greedy baselines: " + "; ".join(f"`{c}`" for c in greedy) + ".",
        "",
        "## Sec. 3.3: semantic rewards (column K is the greedy caption)",
        "",
        *stage("CLIP text embeddings", "E_T(c), unit rows, K samples then the greedy caption",
               "`run.clip_text` then `train.with_baseline`", [("emb", cos_args[1])]),
        *stage("CLIP-cos", "r_cos = 100 * cos(v, E_T(c))", "`cgtgan.clip_cos_reward`",
               [("r_cos", r_cos)]),
        *stage("CLIP-agg", "a = sum_j softmax_j(t * cos(v, s_j)) * s_j; r_agg = 50 * cos(a, E_T(c))"
               " + 50 * (1 - mean_d |a_d - E_T(c)_d|)",
               "`cgtgan.clip_agg_target` (once per run), `cgtgan.clip_agg_reward`",
               [("batch.agg_targets (a)", batch.agg_targets), ("r_agg", r_agg)]),
        *stage("Semantic reward", "r_sem = w * r_agg + (1 - w) * r_cos", "`cgtgan.semantic_reward`",
               [("r_sem", r_sem)]),
        "## Sec. 3.2: the discriminator",
        "",
        *stage("Discriminator logits", "D(s) for B*K corpus sentences, D(c) for B*K samples and "
               "B greedy captions", "`train.discriminate`", [("d_all", d_all)]),
        *stage("Naturalness reward", "r_nat = D(c), the logit", "`cgtgan.naturalness_reward`",
               [("r_nat", r_nat)]),
        *stage("Discriminator loss", "L_D = -mean log sigmoid(D(s)) / 2 - mean log(1 - sigmoid("
               "D(c))) / 2", "`cgtgan.discriminator_loss`, then `train.update` (AdamW, clip 1.0)",
               [("real logits", d_args[0]), ("fake logits", d_args[1]), ("L_D", d_loss),
                ("D head weight before", seen["D head before"]),
                ("D head weight after", seen["D head after"])]),
        "## Sec. 3.4: the generator's update",
        "",
        *stage("Self-critical loss", f"L_G = lam * L_sem + (1 - lam) * L_nat, lam = {lam:g}; "
               "L_x = -mean_bk (r_x(c_bk) - r_x(greedy_b)) * mean_t log p(w_bkt)",
               "`cgtgan.generator_loss` (`scst_loss` per term, `caption_log_prob` per caption)",
               [("L_sem", g_stats["loss_sem"]), ("L_nat", g_stats["loss_nat"]), ("L_G", g_loss)]),
        *stage("Updated weights", "theta <- AdamW(theta, clip(grad L_G, 1.0)); the first layer of "
               "the mapping network shown", "`train.update`",
               [("W1 before", seen["W1 before"]), ("grad W1", seen["W1 grad"]),
                ("W1 after", seen["W1 after"])]),
        "The step returns its log line (`stats`): " + ", ".join(
            f"{key} {value:.4g}" for key, value in stats.items() if isinstance(value, float)) + ".",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else OUT
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float rounding on every run of this machine
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run, batch = build(Path(tmp))
            calls, seen = record_step(run, batch)
            out.write_text(page(run, batch, calls, seen))
    finally:
        torch.set_num_threads(threads)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
