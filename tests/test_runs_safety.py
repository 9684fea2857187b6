"""No result is ever lost or misreported: a run folder is locked while a process trains in it, a
plain `train` never overwrites a run, the default run name tells other settings apart, best.pt
only ever holds a CgT-GAN checkpoint (and --resume keeps an earlier best), `eval` scores only the
run's own checkpoints, and --resume logs each step once. Tiny models on test_cgtgan.py's world."""
from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

import cli
import commands
import config
import runs
import train
from test_cgtgan import tiny_config, tiny_world
from test_fixes import interrupt_at, tiny_argv
from test_readme import bash_lines


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory.mktemp("tiny_world_safety"))


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    """A complete tiny run: (its config, its folder)."""
    cfg = tiny_config(runs_dir=str(tmp_path_factory.mktemp("runs")), name="done")
    commands.run_train(cfg, world)
    return cfg, runs.run_dir_for(cfg)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ----------------------------------------------------------------------------------------------
# One process trains in a folder at a time; a plain train never overwrites a run


def test_second_process_in_the_same_folder_is_refused(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(commands, "load_data", lambda cfg: world)
    (tmp_path / "busy").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from filelock import FileLock; "
         "lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); sys.stdin.read()",
         str(tmp_path / "busy" / ".lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli.main(tiny_argv(runs_dir=str(tmp_path), name="busy")) == 2
        assert f"{tmp_path / 'busy'} is in use by another process" in error_line(capsys)
        assert not (tmp_path / "busy" / "config.json").exists()
    finally:
        holder.communicate("")
    # The lock is released when its holder ends: the folder trains again.
    assert cli.main(tiny_argv(runs_dir=str(tmp_path), name="busy")) == 0


def test_plain_train_never_overwrites_a_run(world, finished, tmp_path, monkeypatch, capsys):
    cfg, run_dir = finished
    monkeypatch.setattr(commands, "load_data", lambda cfg: world)
    shutil.copytree(run_dir, tmp_path / "done")
    results = (tmp_path / "done" / "results.json").read_bytes()
    for sets in ({}, {"gan.lr": 0.5}):
        assert cli.main(tiny_argv(runs_dir=str(tmp_path), name="done", **sets)) == 2
        err = error_line(capsys)
        assert f"{tmp_path / 'done'} holds a run (results.json, best.pt, last.pt)" in err
        assert "--resume" in err and "--name NEW" in err and "--overwrite" in err
        assert (tmp_path / "done" / "results.json").read_bytes() == results
    # --overwrite starts it again: the earlier run's files are gone before the new ones come.
    shutil.copyfile(tmp_path / "done" / "best.pt", tmp_path / "old_best.pt")
    commands.open_run_dir(runs.build_run(tiny_config(runs_dir=str(tmp_path), name="done"), world,
                                         with_clip=False), tmp_path / "done", resume=False)
    for name in ("results.json", "best.pt", "last.pt", "metrics.jsonl"):
        assert not (tmp_path / "done" / name).exists(), name
    shutil.copyfile(tmp_path / "old_best.pt", tmp_path / "done" / "best.pt")
    assert cli.main(tiny_argv(runs_dir=str(tmp_path), name="done") + ["--overwrite"]) == 0
    assert json.loads((tmp_path / "done" / "results.json").read_text())["test"]


def test_default_run_name_reflects_the_settings():
    assert config.run_name(config.Config()) == "shapesworld_seed0"
    lr = config.apply_overrides(config.Config(), {"gan.lr": "1e-3"})
    name = config.run_name(lr)
    assert name.startswith("shapesworld_seed0_") and len(name) == len("shapesworld_seed0_") + 6
    assert config.run_name(config.apply_overrides(config.Config(), {"gan.lr": "1e-3"})) == name
    assert config.run_name(config.apply_overrides(config.Config(), {"gan.lr": "2e-3"})) != name
    # Where files go and how fast the run goes change no result, and not the name.
    same = config.apply_overrides(config.Config(), {"runs_dir": "elsewhere", "threads": "2"})
    assert config.run_name(same) == "shapesworld_seed0"
    coco = config.apply_overrides(config.Config(), config.PRESETS["coco"])
    assert config.run_name(coco, "coco") == "coco_seed0"
    assert config.run_name(config.apply_overrides(coco, {"gan.lr": "1e-4"}), "coco") != "coco_seed0"


def test_readme_trains_each_in_its_own_folder():
    """The README's "More commands": each `train` with other settings (not --resume, which
    continues the quick start's run) writes its own folder, never the quick start's."""
    parser = cli.build_parser()
    folders = {}
    for line in bash_lines("python cgtgan.py train"):
        args = parser.parse_args(shlex.split(line)[2:])
        if not args.resume and not args.ablation:
            folders[line] = runs.run_dir_for(cli.config_from_args(args))
    quick_start = folders.pop("python cgtgan.py train")
    assert str(quick_start) == "runs/shapesworld_seed0"
    assert len(folders) >= 3 and quick_start not in folders.values()
    assert len(set(folders.values())) == len(folders), folders


# ----------------------------------------------------------------------------------------------
# best.pt: a CgT-GAN checkpoint that beat every earlier validation, kept across --resume


def scripted_validation(monkeypatch, scores: list[float]) -> None:
    """Validation CIDEr-D in call order from `scores`; the test split is scored for real."""
    real = train.evaluate_generator

    def evaluate(run, split, limit=0):
        if split == "val":
            return {"CIDEr-D": scores.pop(0)}, []
        return real(run, split, limit)

    monkeypatch.setattr(train, "evaluate_generator", evaluate)


def test_best_pt_is_a_cgtgan_step_and_resume_keeps_the_earlier_best(world, tmp_path, monkeypatch,
                                                                    capsys):
    # Validation at steps 0 (the text-only init), 2 and 4. The init's score is the highest but is
    # no candidate; step 2 beats step 4, which runs after a resume from step 3's last.pt.
    scripted_validation(monkeypatch, [9.0, 5.0, 3.0])
    cfg = tiny_config(runs_dir=str(tmp_path), name="best")
    commands.run_train(cfg, world, stop_after=3)
    assert torch.load(tmp_path / "best" / "best.pt", weights_only=True)["step"] == 2
    results = commands.run_train(cfg, world, resume=True)
    assert torch.load(tmp_path / "best" / "best.pt", weights_only=True)["step"] == 2
    assert results["best_step"] == 2 and "CgT-GAN (agg+gan)" in results["test"]


def test_no_best_pt_is_said_not_shown_as_the_init(world, tmp_path, monkeypatch, capsys):
    # No validation after step 0 gives a score (NaN): no best.pt, and the table says so instead
    # of printing a CgT-GAN row.
    scripted_validation(monkeypatch, [9.0, float("nan"), float("nan")])
    results = commands.run_train(tiny_config(runs_dir=str(tmp_path), name="none"), world)
    assert not (tmp_path / "none" / "best.pt").exists()
    assert results["best_step"] is None and "CgT-GAN (agg+gan)" not in results["test"]
    out = capsys.readouterr().out
    assert f"no CgT-GAN (agg+gan) row: {tmp_path / 'none' / 'best.pt'} does not exist" in out
    assert "text-only init" in out


# ----------------------------------------------------------------------------------------------
# eval scores only the run's own checkpoints


def test_eval_refuses_a_checkpoint_of_another_run(world, finished, tmp_path, monkeypatch, capsys):
    cfg, run_dir = finished
    monkeypatch.setattr(commands, "load_data", lambda cfg: world)
    other = tiny_config(runs_dir=str(tmp_path), name="other", **{"gan.lr": 0.5})
    commands.run_train(other, world, stop_after=3)
    # Another run's best.pt (same models, other gan.lr) in this run's folder is refused...
    shutil.copyfile(run_dir / "best.pt", tmp_path / "other" / "best.pt")
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(tmp_path / "other")]) == 2
    err = error_line(capsys)
    assert "best.pt is not this run's: it was made with gan.lr=0.0001" in err and "0.5" in err
    # ...but a shared text-only initialisation is this run's too (the ablation shares one).
    shutil.copyfile(run_dir / "init.pt", tmp_path / "other" / "init.pt")
    assert cli.main(["eval", "--run", str(tmp_path / "other"), "--checkpoint", "init"]) == 0
    # The run's own checkpoint, scored on other data than it trained on, is refused.
    moved = dataclasses.replace(world, train_feats=world.train_feats.roll(1, 0),
                                corpus_feats=world.corpus_feats.roll(1, 0))
    monkeypatch.setattr(commands, "load_data", lambda cfg: moved)
    capsys.readouterr()
    assert cli.main(["eval", "--run", str(run_dir)]) == 2
    assert "trained on other data" in error_line(capsys)


# ----------------------------------------------------------------------------------------------
# --resume logs each step once


def test_resume_after_ctrl_c_logs_each_step_once(world, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "INIT_CKPT_EVERY", 2)
    cfg = tiny_config(runs_dir=str(tmp_path), name="log", **{"init.steps": 8})
    calls = []
    # Ctrl-C at text-only step 6 (init_last.pt holds step 4; steps 1-5 are logged) ...
    interrupt_at(monkeypatch, train, "init_step", lambda *args: calls.append(1) or len(calls) == 6)
    with pytest.raises(KeyboardInterrupt):
        commands.run_train(cfg, world)
    monkeypatch.undo()
    monkeypatch.setattr(train, "INIT_CKPT_EVERY", 2)
    # ... then at CgT-GAN step 3, after step 2's validation (last.pt holds step 2) ...
    interrupt_at(monkeypatch, train, "gan_step", lambda run, g, d, batch, step: step == 2)
    with pytest.raises(KeyboardInterrupt):
        commands.run_train(cfg, world, resume=True)
    monkeypatch.undo()
    commands.run_train(cfg, world, resume=True)
    records = [json.loads(x) for x in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == "init"] == list(range(1, 9))
    assert [r["step"] for r in records if "loss_g" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_CIDEr-D" in r] == [0, 2, 4]
