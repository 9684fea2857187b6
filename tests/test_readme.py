"""The README's commands never rot: the quick start is exactly two commands, the second is what CI
runs, the first really runs end to end (on a tiny world, since the full demo takes minutes) and
writes the files the README shows, and every other `python cgtgan.py ...` line is accepted by the
real command line."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Sizes that make the first quick-start command finish in seconds; everything else is the default.
TINY_WORLD = {"n_clip_pairs": 300, "n_clip_heldout": 60, "n_train": 40, "n_corpus": 150,
              "n_val": 8, "n_test": 12, "clip_steps": 3, "clip_batch_size": 32, "n_clip_closeups": 60,
              "clip_vision_layers": 1, "clip_text_layers": 1, "clip_embed_dim": 32}
TINY_MODEL = {"gen.n_layer": 1, "gen.n_embd": 32, "gen.n_head": 2, "gen.prefix_len": 2,
              "disc.n_layer": 1, "disc.hidden": 32, "disc.n_head": 2, "init.steps": 5,
              "init.batch": 8, "gan.steps": 3, "gan.batch": 4, "gan.k": 2, "gan.eval_every": 2}


def quick_start() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def bash_lines(prefix: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = []
    for block in blocks:
        # Join continuation lines so a command split with backslashes reads as one.
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith(prefix):
                lines.append(line)
    return lines


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    commands = quick_start()
    assert commands == ["python cgtgan.py train", "python -m pytest"], commands
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == commands[1], "the CI script must end with the README's test command"


def test_first_command_runs_and_writes_what_the_readme_shows(tmp_path):
    world = dict(TINY_WORLD, root=str(tmp_path / "world"))
    sets = [f"world.{k}={v}" for k, v in world.items()]
    sets += [f"{k}={v}" for k, v in dict(TINY_MODEL, runs_dir=str(tmp_path / "runs")).items()]
    argv = shlex.split(quick_start()[0]) + [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable] + argv[1:], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for row in ("retrieval (nearest corpus sentence)", "text-only init", "CgT-GAN (agg+gan)"):
        assert row in proc.stdout
    # Settings other than the defaults (the tiny sizes) add their digest to the default name.
    (run_dir,) = (tmp_path / "runs").glob("shapesworld_seed0_*")
    # Every file the README's "What you get" list names must be in the run folder.
    section = README.split("## What the first command prints", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([\w.]+\.(?:json|jsonl|pt|png))`", section))
    assert {"results.json", "samples.png", "curves.png", "metrics.jsonl"} <= named
    for name in named:
        assert (run_dir / name).is_file(), f"README names {name}, the run did not write it"
    results = json.loads((run_dir / "results.json").read_text())
    assert "CgT-GAN (agg+gan)" in results["test"]


def test_every_cgtgan_command_in_the_readme_is_accepted(monkeypatch, capsys):
    import cli
    import commands as pipelines

    seen = []

    def capture(cfg, *args, **kwargs):
        seen.append(cfg)
        return {}

    for name in ("run_train", "run_init", "run_ablation", "run_eval", "run_caption", "run_corpus"):
        monkeypatch.setattr(pipelines, name, capture)
    monkeypatch.setattr(pipelines, "run_prepare", lambda cfg: {"dry run": True})
    commands = [c for c in bash_lines("python cgtgan.py")
                if not c.split()[2:3] in (["eval"], ["caption"])]
    assert len(commands) >= 5
    for command in commands:
        argv = shlex.split(command)[2:]
        assert cli.main(argv) == 0, (f"README: `{command}` is refused by the CLI: "
                                        f"{capsys.readouterr().err.strip()}")


@pytest.mark.parametrize("command", bash_lines("python evaluate.py"))
def test_evaluate_commands_name_real_options(command):
    import evaluate

    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--help"])
    assert stop.value.code == 0
    # The options evaluate.py's own parser declares, read from the parser, not a list kept here.
    options = {o for action in evaluate.build_parser()._actions for o in action.option_strings}
    for option in re.findall(r"--[\w-]+", command):
        assert option in options, f"README: {command!r} uses {option}, which evaluate.py lacks"
