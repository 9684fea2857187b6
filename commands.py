"""The pipelines behind `python cgtgan.py {train,init,prepare,eval,caption}` (parsed in cli.py).

CgT-GAN (arXiv:2308.12045) is tested as the paper's Tables 1-4 test it: initialise the captioner on
text alone (Sec. 3.1), train it adversarially on unpaired images (Sec. 3.4), keep the checkpoint
with the best validation CIDEr, and score greedy captions of the test split (Sec. 4.1), beside the
nearest-corpus-sentence baseline. `run_train` chains those stages and prints the table;
`run_ablation` repeats the GAN stage for each reward of the ablation from one initialisation.

Each function takes a Config (config.py) and, optionally, the data already built (tests pass a
tiny world); the stages themselves are train.py's.
"""
from __future__ import annotations

import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

import clip_model
import figures
import realdata
import runs
import train
from config import Config, ConfigError, RealDataConfig, Reward, config_dict
from data import CaptionData, DataError, write_json
from shapesworld import build_shapesworld
from train import TrainingError

# The ablation's rows (the paper's Table 4): each reward and its name in the table.
ABLATION = {Reward.COS: "CLIP-cos", Reward.AGG: "CLIP-agg", Reward.AGG_GAN: "CLIP-agg + GAN"}

# ----------------------------------------------------------------------------------------------
# Data


def load_data(cfg: Config) -> CaptionData:
    """The CaptionData named by cfg.data: ShapesWorld (built or reused), or a prepared real dataset."""
    if cfg.data == "shapesworld":
        return build_shapesworld(cfg.world).validate()
    if cfg.data == "real":
        return realdata.load_real_data(real_config(cfg), cfg.gan.agg_raw)
    raise ConfigError(f"data must be shapesworld or real, not {cfg.data!r}")


def real_config(cfg: Config) -> RealDataConfig:
    """cfg.real (the paper-scale dataset's files and cleaning) on the run's device."""
    return replace(cfg.real, device=cfg.device)


def dataset_title(cfg: Config, data: CaptionData) -> str:
    """The name of the dataset whose val/test splits are scored, for printed tables (for ZS-IC
    runs, real.eval_split_file's dataset, not the training images')."""
    if cfg.data == "shapesworld":
        return "ShapesWorld"
    return real_config(cfg).eval_dataset_name() if cfg.data == "real" else data.name


# ----------------------------------------------------------------------------------------------
# The test table


def test_table(run: runs.Run, rows: dict[str, Path | None]) -> dict:
    """Test metrics of each row: None is the retrieval baseline, a path a generator checkpoint."""
    images, out, captions = run.data.splits["test"], {}, {}
    for label, checkpoint in rows.items():
        if checkpoint is None:
            caps = train.retrieval_captions(run.data, images.feats)
            out[label] = train.score_captions(run.data, "test", images.ids, caps)
        else:
            runs.load_checkpoint(checkpoint, run, sections=("gen",))
            out[label], caps = train.evaluate_generator(run, "test")
        captions[label] = caps
    return {"metrics": out, "captions": captions}


def format_table(metrics: dict[str, dict], title: str) -> str:
    cols = ["CIDEr-D", "BLEU-4", "ROUGE-L", "fluency", "faithfulness", "length"]
    width = max(len(r) for r in metrics) + 2
    lines = [title, f"{'':{width}}" + "".join(f"{c:>13}" for c in cols)]
    for label, m in metrics.items():
        lines.append(f"{label:{width}}" + "".join(
            f"{m[c]:>13.1f}" if c in m else f"{'-':>13}" for c in cols))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# train: text-only init -> CgT-GAN -> test table


def ensure_init(run: runs.Run, run_dir: Path, log, resume: bool = False) -> None:
    """Run the text-only stage unless run_dir/init.pt already matches this config and data."""
    if runs.init_is_current(run_dir / "init.pt", run):
        if run.master_process:
            print(f"reusing the text-only initialisation in {run_dir / 'init.pt'}")
        return
    if not resume and run.master_process:
        (run_dir / "init_last.pt").unlink(missing_ok=True)
    run.barrier()
    t0 = time.time()
    train.train_init(run, run_dir, log)
    if run.master_process:
        steps = train.total_steps(run.cfg.init, len(run.data.corpus))
        print(f"text-only initialisation: {steps} steps in {time.time() - t0:.0f}s")


# What `--resume` continues from, in the order it looks: the CgT-GAN state (train only), then the
# finished text-only initialisation, then an interrupted one.
RESUME_FROM = {"train": ("last.pt", "init.pt", "init_last.pt"), "init": ("init.pt", "init_last.pt")}


def check_resumable(run_dir: Path, command: str = "train") -> None:
    """--resume needs an earlier run in run_dir: refused in one line when it holds no checkpoint."""
    if not any((run_dir / name).is_file() for name in RESUME_FROM[command]):
        raise ConfigError(f"nothing to resume in {run_dir} (no {', '.join(RESUME_FROM[command])}); "
                          "run the same command without --resume to start it")


def saved_progress(cfg: Config, command: str = "train") -> str | None:
    """What `command --resume` would continue from in cfg's run folder, in words (None: nothing)."""
    for name in RESUME_FROM[command]:
        path = runs.run_dir_for(cfg) / name
        if not path.is_file():
            continue
        if name == "init.pt":
            return f"the finished text-only initialisation is saved in {path}"
        try:  # the step only: mmap reads no weights
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            step = saved["step"]
        except (RuntimeError, OSError, EOFError, KeyError):
            return f"{path} is unreadable"
        stage, total = ("CgT-GAN", cfg.gan.steps) if name == "last.pt" else ("text-only", cfg.init.steps)
        total = saved.get("total", total)  # the steps of its epochs, when it trains in epochs
        return f"{stage} step {step} of {total} is saved in {path}"
    return None


def open_run_dir(run: runs.Run, run_dir: Path, resume: bool) -> runs.MetricsLog:
    """The run folder with its config.json, and its metrics log: continued (cut back to last.pt's
    step) with --resume, else started afresh (an earlier run's last.pt removed, so that a later
    --resume continues this run, not that one)."""
    log = runs.MetricsLog(run_dir / "metrics.jsonl", enabled=run.master_process)
    if run.master_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.write_config(run_dir, run.cfg, resume)
        if resume and (run_dir / "last.pt").is_file():
            log.truncate("gan", torch.load(run_dir / "last.pt", weights_only=True)["step"])
        elif not resume:
            log.path.unlink(missing_ok=True)
            (run_dir / "last.pt").unlink(missing_ok=True)
    return log


def run_train(cfg: Config, data: CaptionData | None = None, resume: bool = False,
              stop_after: int | None = None, run_dir: Path | None = None,
              table: bool = True) -> dict | None:
    """The full pipeline: text-only init -> CgT-GAN -> test table, figures and results.json."""
    t0, cpu0 = time.time(), time.process_time()
    run_dir = run_dir or runs.run_dir_for(cfg)
    if resume:
        check_resumable(run_dir)
    runs.init_distributed(cfg)
    data = data if data is not None else load_data(cfg)
    run = runs.build_run(cfg, data)
    log = open_run_dir(run, run_dir, resume)
    ensure_init(run, run_dir, log, resume)
    t1 = time.time()
    train.train_gan(run, run_dir, log, resume=resume, stop_after=stop_after)
    run.barrier()
    if not run.master_process or stop_after:
        return None
    steps = train.total_steps(cfg.gan, len(data.train_ids))
    print(f"CgT-GAN ({cfg.gan.reward}): {steps} steps in {time.time() - t1:.0f}s")
    label = f"CgT-GAN ({cfg.gan.reward})"
    result = test_table(run, {"retrieval (nearest corpus sentence)": None,
                              "text-only init": run_dir / "init.pt", label: run_dir / "best.pt"})
    figures.draw_samples(data, result["captions"][label], run_dir / "samples.png")
    figures.draw_curves(log.records(), run_dir / "curves.png")
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    best = torch.load(run_dir / "best.pt", weights_only=True)
    results = {"test": result["metrics"], "best_step": best["step"], "wall_s": round(wall, 1),
               "cpu_s": round(cpu, 1), "config": config_dict(cfg)}
    write_json(run_dir / "results.json", results, indent=2)
    if table:
        print(format_table(result["metrics"], f"{dataset_title(cfg, data)} test split "
                           f"({len(data.splits['test'].ids)} images), seed {cfg.seed}; "
                           "x100 except length (words)"))
        print(f"run folder {run_dir}; wall time {wall / 60:.1f} min (CPU time {cpu / 60:.1f} min, "
              f"{torch.get_num_threads()} threads)")
    return results


def run_ablation(cfg: Config, data: CaptionData | None = None) -> dict:
    """The paper's reward ablation from one initialisation: CLIP-cos, CLIP-agg, CLIP-agg + GAN."""
    t0 = time.time()
    data = data if data is not None else load_data(cfg)
    base = runs.run_dir_for(cfg).with_name(runs.run_dir_for(cfg).name + "_ablation")
    base.mkdir(parents=True, exist_ok=True)
    run = runs.build_run(cfg, data)
    ensure_init(run, base, runs.MetricsLog(base / "metrics.jsonl"))
    rows = {"text-only init": base / "init.pt"}
    for reward, label in ABLATION.items():
        sub = base / reward.value
        sub.mkdir(exist_ok=True)
        shutil.copyfile(base / "init.pt", sub / "init.pt")
        run_train(replace(cfg, gan=replace(cfg.gan, reward=reward)), data, run_dir=sub, table=False)
        rows[label] = sub / "best.pt"
    metrics = test_table(run, rows)["metrics"]
    write_json(base / "ablation.json", metrics, indent=2)
    print(format_table(metrics, f"Ablation on the {dataset_title(cfg, data)} test split, "
                       f"seed {cfg.seed}; x100 except length (words)"))
    print(f"run folder {base}; wall time {(time.time() - t0) / 60:.1f} min")
    return metrics


# ----------------------------------------------------------------------------------------------
# The other commands: init only, prepare, eval, caption


def run_init(cfg: Config, data: CaptionData | None = None, resume: bool = False) -> Path:
    """The text-only stage alone, then its validation scores."""
    run_dir = runs.run_dir_for(cfg)
    if resume:
        check_resumable(run_dir, "init")
    data = data if data is not None else load_data(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    runs.write_config(run_dir, cfg, resume)
    run = runs.build_run(cfg, data, with_clip=False)
    ensure_init(run, run_dir, runs.MetricsLog(run_dir / "metrics.jsonl"), resume)
    metrics, _ = train.evaluate_generator(run, "val")
    print(format_table({"text-only init": metrics}, "validation split"))
    return run_dir / "init.pt"


def run_prepare(cfg: Config) -> dict:
    """Paper scale: CLIP embeddings and CLIP-agg targets of a dataset (realdata.prepare)."""
    return realdata.prepare(real_config(cfg), cfg.gan.agg_raw)


def run_eval(cfg: Config, run_dir: Path, split: str, checkpoint: str = "best",
             data: CaptionData | None = None) -> dict:
    """Metrics of a checkpoint on a split, printed and written to run_dir/eval-<dataset>-<split>-
    <checkpoint>.json with the captions. Paper scale reads only that split (realdata.load_eval_data),
    which is real.eval_split_file's when set: a ZS-IC run is scored on another dataset that way."""
    if data is None and cfg.data == "real":
        data = realdata.load_eval_data(real_config(cfg), split)
    data = data if data is not None else load_data(cfg)
    run = runs.build_run(cfg, data, with_clip=False)
    runs.load_checkpoint(run_dir / f"{checkpoint}.pt", run, sections=("gen",))
    metrics, captions = train.evaluate_generator(run, split)
    ids, title = data.splits[split].ids, dataset_title(cfg, data)
    print(format_table({f"{run_dir.name} ({checkpoint}.pt)": metrics},
                       f"{title} {split} split ({len(ids)} images)"))
    name = re.sub(r"\W+", "_", title)
    write_json(run_dir / f"eval-{name}-{split}-{checkpoint}.json",
               {"dataset": title, "split": split, "checkpoint": checkpoint, "metrics": metrics,
                "captions": dict(zip(ids, captions))}, indent=2)
    return metrics


def read_image(path: str):
    """(the RGB image, None) for a readable image file, else (None, a one-line error naming it)."""
    if Path(path).is_dir():
        return None, f"image file {path} is a directory, not an image"
    if not Path(path).exists():
        return None, f"image file {path} not found"
    try:
        return clip_model.load_image(path), None
    except (OSError, ValueError) as err:  # not an image, truncated, empty or unreadable
        return None, str(err)


def run_caption(cfg: Config, run_dir: Path, images: list[str],
                data: CaptionData | None = None) -> tuple[list[tuple[str, str]], list[str]]:
    """Captions for image files: CLIP image embedding -> generator (best.pt), greedy.

    Returns (path, caption) for each readable file, in order, and a one-line error for each file
    that is missing, a directory, or not an image; the model is loaded only if one is readable.
    """
    opened = [(path, *read_image(path)) for path in images]
    good = [(path, image) for path, image, error in opened if error is None]
    errors = [error for _, _, error in opened if error is not None]
    if not good:
        return [], errors
    data = data if data is not None else load_data(cfg)
    run = runs.build_run(cfg, data, with_clip=False)
    runs.load_checkpoint(run_dir / "best.pt", run, sections=("gen",))
    clip, preprocess = clip_model.load(str(data.clip_path), device=run.device)
    with torch.no_grad():
        pixels = preprocess([image for _, image in good]).to(run.device)
        feats = clip.encode_image(pixels).float()  # (n, D), raw as the official code feeds it
        if cfg.gen.normalize_prefix:
            feats = F.normalize(feats, dim=-1)
    return list(zip([path for path, _ in good], train.caption_feats(run, feats))), errors
