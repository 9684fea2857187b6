"""The command line of CgT-GAN: `python cgtgan.py {train,init,prepare,eval,caption,corpus} ...`.

CgT-GAN (arXiv:2308.12045): `train` runs the paper's two stages on ShapesWorld (default) or, with a
`--preset`, at paper scale (Sec. 4.1), and prints the test table. This file only parses: every
option becomes a typed config field (config.py), and commands.py runs the pipeline. Errors the
user can fix (a bad setting, a missing file, a NaN loss) end in one line and exit code 2; Ctrl-C
ends in one line saying what was saved and the command that resumes, and exit code 130.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import classroom
from config import (BEHAVIOUR_DIFFERENCES, EVAL_DATASETS, PRESETS, Config, ConfigError, Reward,
                    apply_overrides, config_dict, config_from_dict, differences, parse_sets,
                    run_name)

REWARDS = [r.value for r in Reward]
# What `corpus` builds (corpora.py): a corpus text file from a public file, or the ZS-IC image list.
CORPORA = ("coco", "flickr30k", "gcc", "shutterstock", "web-images")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="cgtgan.py", description="CgT-GAN: CLIP-guided Text GAN for image captioning "
        "(arXiv:2308.12045), on ShapesWorld or at paper scale.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [("train", "text-only init + CgT-GAN + test table (default: ShapesWorld)"),
                       ("init", "text-only initialisation only"),
                       ("prepare", "paper scale: CLIP embeddings and CLIP-agg targets of a dataset"),
                       ("config", "print the resolved settings as JSON and how they differ from "
                                  "the official code")]:
        p = sub.add_parser(name, help=text)
        p.add_argument("--preset", help=f"paper-scale settings: {', '.join(PRESETS)}")
        p.add_argument("--seed", type=int, help="random seed of the run (default 0)")
        p.add_argument("--name", help="run folder name under runs/ (default: from data or preset, "
                       "reward, seed, and a digest of any other changed settings)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config field, e.g. --set gan.lr=1e-4 (repeatable)")
        if name != "config":
            p.add_argument("--resume", action="store_true",
                           help="continue from the run's last checkpoint")
            p.add_argument("--overwrite", action="store_true",
                           help="start again in a run folder that holds a run (its checkpoints "
                                "and results are removed)")
        if name in ("train", "init"):
            p.add_argument("--student", metavar="FILE",
                           help="classroom: run with the exercise functions written in FILE "
                                "(docs/exercises.md) in place of the project's")
        if name == "train":
            p.add_argument("--reward", choices=REWARDS, help="the generator's reward (ablation)")
            p.add_argument("--ablation", action="store_true",
                           help="CLIP-cos, CLIP-agg and CLIP-agg + GAN from one initialisation")
    p = sub.add_parser("eval", help="metrics of a trained run on a split, of its own dataset or another")
    p.add_argument("--run", default="runs/shapesworld_seed0", help="the run folder to score")
    p.add_argument("--split", default="test", choices=["val", "test"], help="the split to score")
    p.add_argument("--checkpoint", default="best", choices=["best", "init"],
                   help="best.pt (CgT-GAN) or init.pt (the text-only initialisation)")
    p.add_argument("--dataset", choices=list(EVAL_DATASETS),
                   help="score on this dataset's Karpathy split (the presets' paths), e.g. ZS-IC")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a field of the run's config, e.g. --set real.eval_split_file=F "
                        "--set real.eval_image_root=DIR to score on any Karpathy split file")
    p.add_argument("--fast", action="store_true",
                   help="skip METEOR and SPICE, which run in Java (by default each is computed "
                        "where Java and its files are present, and named when they are not)")
    p = sub.add_parser("caption", help="caption image files with a trained run")
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("--run", default="runs/shapesworld_seed0", help="the run folder whose best.pt captions")
    add_corpus_parser(sub)
    return parser


def add_corpus_parser(sub) -> None:
    """`corpus KIND INPUT OUTPUT`: an external corpus or the ZS-IC image list (corpora.py)."""
    p = sub.add_parser("corpus", help="paper scale: a corpus file (one sentence per line) from its "
                       "public file, with the official preprocessing; or the ZS-IC image list")
    p.add_argument("kind", choices=CORPORA,
                   help="coco / flickr30k: Karpathy split json -> its train captions; gcc: "
                        "Conceptual Captions TSV; shutterstock: one caption per line; web-images: "
                        "an image folder -> a Karpathy-format image list (split train)")
    p.add_argument("input", help="the public file, or the image folder for web-images")
    p.add_argument("output", help="the file to write, e.g. data/gcc.txt or data/dataset_web.json")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random draws (ShutterStock's, and gcc's with --gcc-intended); "
                        "0, the default, is the official code's")
    p.add_argument("--gcc-intended", action="store_true",
                   help="gcc: keep 16-19-word captions with p=0.3, as the official code meant to "
                        "(it drops them all: it re-seeds NumPy inside its loop)")


def config_from_args(args) -> Config:
    """The Config of train/init/prepare: defaults, then --preset, --set, --seed, --reward, --name."""
    cfg = Config()
    if args.preset:
        if args.preset not in PRESETS:
            raise ConfigError(f"unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
        apply_overrides(cfg, PRESETS[args.preset])
    apply_overrides(cfg, parse_sets(args.set))
    if args.seed is not None:
        cfg.seed = args.seed
    if getattr(args, "reward", None):
        cfg.gan.reward = Reward(args.reward)
    if args.name:
        cfg.name = args.name
    elif args.preset:
        cfg.name = run_name(cfg, args.preset)
    if getattr(args, "student", None) and not args.name:
        # A run with a student's functions never shares the reference run's folder.
        cfg.name = f"{run_name(cfg, args.preset or '')}_{Path(args.student).stem}"
    return cfg


def swap_student(path: str) -> dict:
    """--student FILE: the student's written functions put into this run (classroom.swap_in),
    and one line saying which; {} without --student."""
    if not path:
        return {}
    if not Path(path).is_file():
        raise ConfigError(f"--student {path}: no such file (give the path of your solution file)")
    swapped = classroom.swap_in(path)
    stubs = classroom.written_functions(Path(path).read_text())[1]
    print(classroom.swap_report(path, swapped, stubs), flush=True)
    return swapped


def show_config(args) -> int:
    """`config`: the resolved settings as JSON, then every setting that differs from the official
    code (config.differences) and the differences that are no setting, each with its reason."""
    cfg = config_from_args(args)
    print(json.dumps(config_dict(cfg), indent=2))
    rows = [(key, repr(official), repr(ours), why) for key, official, ours, why in differences(cfg)]
    print(f"\nsettings that differ from the official code (Lihr747/CgtGAN): {len(rows)}")
    if rows:
        width = [max(len(r[i]) for r in rows + [("key", "official", "ours")]) for i in range(3)]
        print(f"{'key':{width[0]}}  {'official':{width[1]}}  {'ours':{width[2]}}  why")
        for key, official, ours, why in rows:
            print(f"{key:{width[0]}}  {official:{width[1]}}  {ours:{width[2]}}  {why}")
    print("\nwhat differs and is no setting:")
    for what, official, ours, why in BEHAVIOUR_DIFFERENCES:
        print(f"- {what}: official {official}; ours {ours}. Why: {why}")
    return 0


def run_config(run: str) -> tuple[Config, Path]:
    """The Config a trained run was made with (its config.json), and its folder."""
    path = Path(run) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found; give the run folder of a trained run with --run")
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is unreadable ({type(err).__name__}); train the run again") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} holds no config (a JSON {type(saved).__name__}); train the run again")
    return config_from_dict(saved), Path(run)


def eval_config(args) -> tuple[Config, Path]:
    """The run's config with eval's target: --dataset (a preset dataset's split file and images)
    and --set overrides, e.g. real.eval_split_file / real.eval_image_root for any other split file."""
    cfg, run_dir = run_config(args.run)
    overrides = dict(EVAL_DATASETS[args.dataset]) if args.dataset else {}
    overrides.update(parse_sets(args.set))
    if cfg.data != "real" and any(k.startswith("real.") for k in overrides):
        raise ConfigError(f"--dataset and real.* settings score paper-scale runs (data=real); "
                          f"{run_dir} was trained on {cfg.data}")
    return apply_overrides(cfg, overrides), run_dir


def caption(args, commands) -> int:
    """Print a caption for every good image file (with a warning line after it when the image is
    unlike the training images) and one error line for each bad one."""
    cfg, run_dir = run_config(args.run)
    captions, errors = commands.run_caption(cfg, run_dir, args.images)
    for path, text, warning in captions:
        print(f"{path}: {text}", flush=True)
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    return 2 if errors else 0


def interrupted(args, argv: list[str], commands) -> str:
    """The line Ctrl-C prints: what the run folder holds, and the exact command that continues."""
    command = ["python", "cgtgan.py", *[a for a in argv if a not in ("--resume", "--overwrite")]]
    if args.command not in ("train", "init") or getattr(args, "ablation", False):
        # An ablation's reward runs that finished or saved a state refuse a plain train.
        again = command + ["--overwrite"] if getattr(args, "ablation", False) else command
        return f"interrupted; run `{shlex.join(again)}` to start over"
    cfg = config_from_args(args)
    saved = commands.saved_progress(cfg, args.command)
    if saved is None:
        fresh = command + (["--overwrite"] if "--overwrite" in argv else [])
        return (f"interrupted before anything was saved in {commands.runs.run_dir_for(cfg)}; "
                f"start again with: {shlex.join(fresh)}")
    return f"interrupted; {saved}; resume with: {shlex.join(command + ['--resume'])}"


def main(argv: list[str] | None = None) -> int:
    """Parse, run one command, and turn the errors a user can fix into one line (exit code 2).
    Ctrl-C says what was saved and how to resume (exit code 130)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.command == "config":
        try:
            return show_config(args)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    # The pipelines import torch and the models: only after parsing, so --help and `config`
    # answer at once.
    import commands

    try:
        if getattr(args, "resume", False) and getattr(args, "overwrite", False):
            raise ConfigError("--resume continues the run and --overwrite starts it again; choose one")
        if args.command == "eval":
            cfg, run_dir = eval_config(args)
            commands.run_eval(cfg, run_dir, args.split, args.checkpoint, java=not args.fast)
        elif args.command == "caption":
            return caption(args, commands)
        elif args.command == "corpus":
            commands.run_corpus(args.kind, args.input, args.output, args.seed, args.gcc_intended)
        else:
            cfg = config_from_args(args)
            swapped = swap_student(getattr(args, "student", None))
            if args.command == "prepare":
                print(json.dumps(commands.run_prepare(cfg), indent=2))
            elif args.command == "init":
                commands.run_init(cfg, resume=args.resume, overwrite=args.overwrite)
            elif args.ablation:
                commands.run_ablation(cfg, overwrite=args.overwrite)
            else:
                commands.run_train(cfg, resume=args.resume, overwrite=args.overwrite)
            if swapped:
                print(classroom.calls_report(swapped))
    except (ConfigError, commands.DataError, commands.TrainingError, classroom.StudentError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Reported after this block: by then the stopped stage's frames are released, and with
        # them its progress bar (closed, its line cleared).
        pass
    else:
        return 0
    # Under torchrun every process gets Ctrl-C; the first one says what was saved.
    if os.environ.get("RANK", "0") == "0":
        print(interrupted(args, argv, commands), file=sys.stderr)
    return 130
