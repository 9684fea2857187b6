"""The pipelines behind `python cgtgan.py {train,init,prepare,eval,caption,corpus}` (cli.py parses).

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
import corpora
import evaluate
import figures
import realdata
import runs
import train
from config import Config, ConfigError, RealDataConfig, Reward, check_world_size, config_dict
from data import (CaptionData, DataError, Familiarity, atomic_write, forks, in_processes,
                  write_json)
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
    """The rows' metrics as a table; METEOR and SPICE columns only where a row has them."""
    java = [c for c in ("METEOR", "SPICE") if any(c in m for m in metrics.values())]
    cols = ["CIDEr-D", "BLEU-4", "ROUGE-L", *java, "fluency", "faithfulness", "length"]
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
    """The run folder with its config.json, and its metrics log: continued with --resume (cut
    back to what the checkpoints it resumes from had logged), else started afresh (an earlier
    run's files removed, so that a later --resume continues this run, not that one)."""
    log = runs.MetricsLog(run_dir / "metrics.jsonl", enabled=run.master_process)
    if run.master_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.write_config(run_dir, run.cfg, resume)
        if resume:
            log.truncate("init", resume_step(run_dir / "init_last.pt", run_dir / "init.pt",
                                             run.cfg.init.steps))
            log.truncate("gan", resume_step(run_dir / "last.pt"))
        else:
            for name in (log.path.name, *runs.TRAINED):
                (run_dir / name).unlink(missing_ok=True)
    return log


def resume_step(last: Path, done: Path | None = None, steps: int = 0) -> int:
    """The step a stage resumes at: its checkpoint `last`'s, else `steps` when the stage's final
    checkpoint `done` exists, else 0 (the stage starts again)."""
    if last.is_file():
        return torch.load(last, map_location="cpu", weights_only=True, mmap=True)["step"]
    return steps if done is not None and done.is_file() else 0


def run_train(cfg: Config, data: CaptionData | None = None, resume: bool = False,
              stop_after: int | None = None, run_dir: Path | None = None,
              table: bool = True, overwrite: bool = False) -> dict | None:
    """The full pipeline: text-only init -> CgT-GAN -> test table, figures and results.json.
    The run folder is locked while it runs; a folder holding a run is continued only with
    --resume and started again only with overwrite."""
    run_dir = run_dir or runs.run_dir_for(cfg)
    if resume:
        check_resumable(run_dir)
    with runs.folder_lock(run_dir):
        if not resume:
            runs.check_fresh(run_dir, overwrite)
        if cfg.procs > 1 and not runs.data_parallel():
            check_world_size(cfg, cfg.procs)
            data = data if data is not None else load_data(cfg)  # a world is built once, here
            try:
                return in_processes(_train_and_test, cfg.procs, cfg.threads, cfg,
                                    data if forks(cfg.threads) else None, resume, stop_after,
                                    run_dir, table)
            except torch.multiprocessing.ProcessExitedException as err:  # killed, say
                raise TrainingError(f"a training process stopped ({err}); the checkpoints it "
                                    "saved are kept: continue the run with --resume") from None
        return _train_and_test(cfg, data, resume, stop_after, run_dir, table)


def _train_and_test(cfg: Config, data: CaptionData | None, resume: bool, stop_after: int | None,
                    run_dir: Path, table: bool) -> dict | None:
    """run_train's stages in the locked folder; the table has no CgT-GAN row without best.pt."""
    t0, cpu0 = time.time(), time.process_time()
    runs.init_distributed(cfg)
    data = data if data is not None else load_data(cfg)
    run = runs.build_run(cfg, data)
    if resume and (run_dir / "last.pt").is_file():  # refused before any file is written
        runs.load_checkpoint(run_dir / "last.pt", run, sections=(), same_data=True)
    log = open_run_dir(run, run_dir, resume)
    ensure_init(run, run_dir, log, resume)
    t1 = time.time()
    train.train_gan(run, run_dir, log, resume=resume, stop_after=stop_after)
    run.barrier()
    if not run.master_process or stop_after:
        return None
    steps = train.total_steps(cfg.gan, len(data.train_ids))
    print(f"CgT-GAN ({cfg.gan.reward}): {steps} steps in {time.time() - t1:.0f}s")
    label, best = f"CgT-GAN ({cfg.gan.reward})", run_dir / "best.pt"
    rows = {"retrieval (nearest corpus sentence)": None, "text-only init": run_dir / "init.pt"}
    if best.is_file():
        rows[label] = best
    result = test_table(run, rows)
    if best.is_file():
        figures.draw_samples(data, result["captions"][label], run_dir / "samples.png")
    figures.draw_curves(log.records(), run_dir / "curves.png")
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    best_step = torch.load(best, weights_only=True)["step"] if best.is_file() else None
    results = {"test": result["metrics"], "best_step": best_step, "wall_s": round(wall, 1),
               "cpu_s": round(cpu, 1), "config": config_dict(cfg)}
    write_json(run_dir / "results.json", results, indent=2)
    if table:
        print(format_table(result["metrics"], f"{dataset_title(cfg, data)} test split "
                           f"({len(data.splits['test'].ids)} images), seed {cfg.seed}; "
                           "x100 except length (words)"))
        if best_step is None:
            print(f"no {label} row: {best} does not exist (no validation after step 0 was "
                  "recorded; see metrics.jsonl)")
        print(f"run folder {run_dir}; wall time {wall / 60:.1f} min (CPU time {cpu / 60:.1f} min, "
              f"{torch.get_num_threads()} threads)")
    return results


def run_ablation(cfg: Config, data: CaptionData | None = None, overwrite: bool = False) -> dict:
    """The paper's reward ablation from one initialisation: CLIP-cos, CLIP-agg, CLIP-agg + GAN.
    Its folder is locked, and refused before any work, as train's, when a reward's run folder
    holds a run (unless overwrite)."""
    base = runs.run_dir_for(cfg).with_name(runs.run_dir_for(cfg).name + "_ablation")
    for reward in ABLATION:
        runs.check_fresh(base / reward.value, overwrite)
    with runs.folder_lock(base):
        return _ablation(cfg, data, base, overwrite)


def _reuse_init(run: runs.Run, source: Path, target: Path) -> None:
    """Copy the same config's `train` run's init.pt (source) to target when it fits this run
    and target does not: the ablation then starts from the default run's initialisation instead
    of training the same one again."""
    if (run.master_process and not runs.init_is_current(target, run)
            and runs.init_is_current(source, run)):
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
        print(f"reusing the text-only initialisation of {source}")
    run.barrier()


def _ablation(cfg: Config, data: CaptionData | None, base: Path, overwrite: bool) -> dict:
    t0 = time.time()
    data = data if data is not None else load_data(cfg)
    run = runs.build_run(cfg, data)
    _reuse_init(run, runs.run_dir_for(cfg) / "init.pt", base / "init.pt")
    ensure_init(run, base, runs.MetricsLog(base / "metrics.jsonl"))
    rows = {"text-only init": base / "init.pt"}
    for reward, label in ABLATION.items():
        sub = base / reward.value
        sub.mkdir(exist_ok=True)
        shutil.copyfile(base / "init.pt", sub / "init.pt")
        run_train(replace(cfg, gan=replace(cfg.gan, reward=reward)), data, run_dir=sub, table=False,
                  overwrite=overwrite)
        rows[label] = sub / "best.pt"
    metrics = test_table(run, rows)["metrics"]
    write_json(base / "ablation.json", metrics, indent=2)
    print(format_table(metrics, f"Ablation on the {dataset_title(cfg, data)} test split, "
                       f"seed {cfg.seed}; x100 except length (words)"))
    print(f"run folder {base}; wall time {(time.time() - t0) / 60:.1f} min")
    return metrics


# ----------------------------------------------------------------------------------------------
# The other commands: init only, prepare, eval, caption, corpus


def run_init(cfg: Config, data: CaptionData | None = None, resume: bool = False,
             overwrite: bool = False) -> Path:
    """The text-only stage alone, then its validation scores (the folder locked, as for train)."""
    run_dir = runs.run_dir_for(cfg)
    if resume:
        check_resumable(run_dir, "init")
    with runs.folder_lock(run_dir):
        if not resume:
            runs.check_fresh(run_dir, overwrite)
        data = data if data is not None else load_data(cfg)
        run = runs.build_run(cfg, data, with_clip=False)
        ensure_init(run, run_dir, open_run_dir(run, run_dir, resume), resume)
        metrics, _ = train.evaluate_generator(run, "val")
    print(format_table({"text-only init": metrics}, "validation split"))
    return run_dir / "init.pt"


def run_prepare(cfg: Config) -> dict:
    """Paper scale: CLIP embeddings and CLIP-agg targets of a dataset (realdata.prepare)."""
    return realdata.prepare(real_config(cfg), cfg.gan.agg_raw)


def write_coco_files(run_dir: Path, split_name: str, checkpoint: str, captions: dict[str, str],
                     references: dict[str, list[str]]) -> tuple[Path, Path]:
    """The captions as a COCO result file (captions-<dataset>-<split>-<checkpoint>.json) and their
    references as COCO caption annotations (references-<dataset>-<split>.json), in run_dir: the
    pair that `python evaluate.py` and pycocoevalcap's COCO / COCOEvalCap both read."""
    results = run_dir / f"captions-{split_name}-{checkpoint}.json"
    annotations = run_dir / f"references-{split_name}.json"
    write_json(results, evaluate.coco_results(captions))
    write_json(annotations, evaluate.coco_annotations(references))
    return results, annotations


def run_eval(cfg: Config, run_dir: Path, split: str, checkpoint: str = "best",
             data: CaptionData | None = None, java: bool = True) -> dict:
    """Metrics of a checkpoint on a split, printed and written to run_dir/eval-<dataset>-<split>-
    <checkpoint>.json with the captions, which also go to a COCO result file (write_coco_files).
    With `java`, METEOR and SPICE are added where Java and their files are present, and each one
    that cannot run is named in one line with what it needs. Paper scale reads only that split
    (realdata.load_eval_data), which is real.eval_split_file's when set: a ZS-IC run is scored on
    another dataset that way."""
    if data is None and cfg.data == "real":
        data = realdata.load_eval_data(real_config(cfg), split)
    data = data if data is not None else load_data(cfg)
    run = runs.build_run(cfg, data, with_clip=False)
    load_own_checkpoint(run, run_dir, f"{checkpoint}.pt")
    metrics, captions = train.evaluate_generator(run, split)
    ids, title = data.splits[split].ids, dataset_title(cfg, data)
    captions = dict(zip(ids, captions))
    references = {i: data.splits[split].references[i] for i in ids}
    notes = ["METEOR, SPICE: skipped (--fast)"]
    if java:
        extra, notes = evaluate.java_scores(captions, references)
        metrics.update({name: 100 * value for name, value in extra.items()})
    print(format_table({f"{run_dir.name} ({checkpoint}.pt)": metrics},
                       f"{title} {split} split ({len(ids)} images)"))
    print("\n".join(notes) or "METEOR and SPICE: computed through pycocoevalcap (Java)")
    split_name = re.sub(r"\W+", "_", title) + f"-{split}"
    write_json(run_dir / f"eval-{split_name}-{checkpoint}.json",
               {"dataset": title, "split": split, "checkpoint": checkpoint, "metrics": metrics,
                "captions": captions}, indent=2)
    results, annotations = write_coco_files(run_dir, split_name, checkpoint, captions,
                                            references)
    print(f"COCO result file {results}; score it with: python evaluate.py {results} {annotations}")
    return metrics


def load_own_checkpoint(run: runs.Run, run_dir: Path, name: str) -> None:
    """The generator of run_dir/name, after checking it belongs to the run in run_dir (its
    config.json, and the data it trained on when run.data holds training embeddings: a paper-scale
    eval reads only the scored split)."""
    checkpoint = runs.load_checkpoint(run_dir / name, run, sections=("gen",))
    own_data = run.data.train_feats.shape[0] > 0
    runs.check_belongs(run_dir / name, checkpoint, run_dir, run.data_fingerprint if own_data else None)


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


def run_caption(cfg: Config, run_dir: Path, images: list[str], data: CaptionData | None = None
                ) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """Captions for image files: CLIP image embedding -> generator (best.pt), greedy.

    Returns (path, caption, warning) for each readable file, in order, the warning a line when the
    image is unlike the training images (data.Familiarity), else None; and a one-line error for
    each file that is missing, a directory, or not an image. The model loads only if one is readable.
    """
    opened = [(path, *read_image(path)) for path in images]
    good = [(path, image) for path, image, error in opened if error is None]
    errors = [error for _, _, error in opened if error is not None]
    if not good:
        return [], errors
    data = data if data is not None else load_data(cfg)
    run = runs.build_run(cfg, data, with_clip=False)
    load_own_checkpoint(run, run_dir, "best.pt")
    clip, preprocess = clip_model.load(str(data.clip_path), device=run.device)
    with torch.no_grad():
        pixels = preprocess([image for _, image in good]).to(run.device)
        feats = clip.encode_image(pixels).float()  # (n, D), raw as the official code feeds it
    unit = F.normalize(feats, dim=-1)  # (n, D)
    if cfg.gen.normalize_prefix:
        feats = unit
    unlike = Familiarity(data, run.device).unlike(unit)
    warnings = [why and f"{path} is unlike the training images of {data.name} ({why}); its caption "
                "is a guess" for (path, _), why in zip(good, unlike)]
    return list(zip([path for path, _ in good], train.caption_feats(run, feats), warnings)), errors


def run_corpus(kind: str, source: str, output: str, seed: int = 0,
               gcc_intended: bool = False) -> dict:
    """An external corpus file from its public file, or the ZS-IC image list (corpora.build)."""
    if gcc_intended and kind != "gcc":
        raise ConfigError(f"--gcc-intended applies to the gcc corpus only, not {kind}")
    summary = corpora.build(kind, source, output, seed, gcc_intended)
    if kind == "web-images":
        print(f"web-images: {summary['written']:,} images under {source} listed in {output}")
    else:
        print(f"{kind}: {summary['read']:,} captions read from {source}; "
              f"{summary['written']:,} sentences written to {output}")
    return summary
