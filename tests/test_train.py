"""Tests of train.py and the CLI: a short end-to-end run writes every output, resume reproduces an
uninterrupted run, bad input gets one-line errors. Tiny models on the synthetic world of
test_cgtgan.py (and a tiny ShapesWorld, marked slow)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import cgtgan
import cli
import commands
import config
import evaluate
import figures
import runs
import train
from test_cgtgan import tiny_config, tiny_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory.mktemp("tiny_world_train"))


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """One complete tiny run (init + CgT-GAN + test table + figures)."""
    cfg = tiny_config(runs_dir=str(tmp_path_factory.mktemp("runs")), name="full")
    results = commands.run_train(cfg, world)
    return cfg, runs.run_dir_for(cfg), results


def gan_losses(run_dir):
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss_g"], r["d_loss"]) for r in records
            if r["stage"] == "gan" and "loss_g" in r]


def test_end_to_end_writes_every_output(trained):
    cfg, run_dir, results = trained
    for name in ("config.json", "init.pt", "last.pt", "best.pt", "metrics.jsonl", "results.json",
                 "samples.png", "curves.png"):
        assert (run_dir / name).is_file(), name
    assert set(results["test"]) == {"retrieval (nearest corpus sentence)", "text-only init",
                                    "CgT-GAN (agg+gan)"}
    for row in results["test"].values():
        assert {"CIDEr-D", "BLEU-4", "ROUGE-L", "fluency", "faithfulness", "length"} <= set(row)
    blob = torch.load(run_dir / "last.pt", weights_only=True)
    assert blob["step"] == cfg.gan.steps and "opt_g" in blob and "rng" in blob
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["stage"] == "gan" and "loss_g" in r]
    assert len(steps) == cfg.gan.steps
    assert {"r_nat", "r_cos", "r_agg", "d_acc", "lambda"} <= set(steps[-1])
    assert any("val_CIDEr-D" in r for r in records)


def test_resume_gives_the_same_losses(world, trained, tmp_path):
    cfg, full_dir, _ = trained
    part = tiny_config(runs_dir=str(tmp_path), name="part")
    commands.run_train(part, world, stop_after=2)
    assert not (tmp_path / "part" / "results.json").exists()
    commands.run_train(part, world, resume=True)
    torch.testing.assert_close(torch.tensor(gan_losses(tmp_path / "part")),
                               torch.tensor(gan_losses(full_dir)), atol=1e-5, rtol=1e-5)


def test_resume_refuses_other_settings(world, trained):
    cfg, run_dir, _ = trained
    other = tiny_config(runs_dir=cfg.runs_dir, name="full")
    other.gan.lr = 0.5
    with pytest.raises(config.ConfigError, match="gan.lr=0.0001 but this run has 0.5"):
        commands.run_train(other, world, resume=True)


def test_resume_refuses_a_run_from_before_a_setting_existed(world, trained, tmp_path):
    cfg, run_dir, _ = trained
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    saved = json.loads((old / "config.json").read_text())
    del saved["gan"]["d_groups"]  # as written by a version without the setting
    (old / "config.json").write_text(json.dumps(saved))
    again = tiny_config(runs_dir=str(tmp_path), name="old")
    with pytest.raises(config.ConfigError, match="predates the setting gan.d_groups .*--overwrite"):
        commands.run_train(again, world, resume=True)


def test_checkpoints_are_tied_to_their_data(world, trained, tmp_path, capsys):
    # Same config, same widths and vocabularies, other CLIP embeddings (as after a change to the
    # world's defaults or its CLIP): init.pt is trained again, not reused, and --resume refuses.
    cfg, run_dir, _ = trained
    other = dataclasses.replace(world, train_feats=world.train_feats.roll(1, 0),
                                corpus_feats=world.corpus_feats.roll(1, 0))
    same = tiny_config(runs_dir=str(tmp_path), name="same")
    (tmp_path / "same").mkdir()
    shutil.copyfile(run_dir / "init.pt", tmp_path / "same" / "init.pt")
    assert runs.init_is_current(tmp_path / "same" / "init.pt", runs.build_run(same, world, False))
    assert not runs.init_is_current(tmp_path / "same" / "init.pt",
                                    runs.build_run(same, other, False))
    before = (run_dir / "init.pt").read_bytes()
    with pytest.raises(config.ConfigError, match="trained on other data"):
        commands.run_train(tiny_config(runs_dir=cfg.runs_dir, name="full"), other, resume=True)
    assert (run_dir / "init.pt").read_bytes() == before  # refused before init.pt was retrained
    capsys.readouterr()
    commands.run_train(same, other, stop_after=1)
    assert "reusing the text-only initialisation" not in capsys.readouterr().out


def test_checkpoint_from_other_config_is_refused(world, trained):
    cfg, run_dir, _ = trained
    other = tiny_config(**{"gen.prefix_len": 3})
    parts = runs.build_run(other, world, with_clip=False)
    with pytest.raises(config.ConfigError, match="gen.prefix_len=2, but this config has 3"):
        runs.load_checkpoint(run_dir / "best.pt", parts, sections=("gen",))


def test_nan_loss_stops_with_step_and_term(world, trained, tmp_path, monkeypatch):
    cfg = tiny_config(runs_dir=str(tmp_path), name="nan")
    commands.run_train(cfg, world, stop_after=2)
    good = (tmp_path / "nan" / "last.pt").read_bytes()
    monkeypatch.setattr(train, "clip_cos_reward", lambda v, c: torch.full(c.shape[:2], float("nan")))
    with pytest.raises(train.TrainingError, match=r"CgT-GAN step 3: loss_g is nan; stopped"):
        commands.run_train(cfg, world, resume=True)
    assert (tmp_path / "nan" / "last.pt").read_bytes() == good


def test_cli_eval_caption_and_errors(world, trained, monkeypatch, capsys, tmp_path):
    cfg, run_dir, _ = trained
    monkeypatch.setattr(commands, "load_data", lambda cfg: world)
    assert cli.main(["eval", "--run", str(run_dir), "--split", "test", "--fast"]) == 0
    out = capsys.readouterr().out
    assert "CIDEr-D" in out and "METEOR, SPICE: skipped (--fast)" in out
    # Its COCO result file (ShapesWorld's ids are strings) scores the same through evaluate.py.
    metrics = json.loads((run_dir / "eval-ShapesWorld-test-best.json").read_text())["metrics"]
    scores = evaluate.evaluate_files(run_dir / "captions-ShapesWorld-test-best.json",
                                     run_dir / "references-ShapesWorld-test.json")
    assert 100 * scores["CIDEr-D"] == pytest.approx(metrics["CIDEr-D"])
    image = tmp_path / "img.png"
    world.image("img0").save(image)
    assert cli.main(["caption", str(image), "--run", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{image}: ") and err == ""
    # A 1x1 image is unlike the training images: captioned all the same, with a one-line warning.
    Image.new("RGB", (1, 1), (128, 128, 128)).save(tmp_path / "dot.png")
    assert cli.main(["caption", str(tmp_path / "dot.png"), "--run", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{tmp_path / 'dot.png'}: ") and err.count("\n") == 1
    assert err.startswith(f"warning: {tmp_path / 'dot.png'} is unlike the training images of tiny")
    assert cli.main(["caption", str(tmp_path / "missing.png"), "--run", str(run_dir)]) == 2
    assert "missing.png not found" in capsys.readouterr().err
    assert cli.main(["train", "--set", "gan.nope=1"]) == 2
    assert "unknown config key 'gan.nope'" in capsys.readouterr().err
    assert cli.main(["eval", "--run", str(tmp_path / "norun")]) == 2
    assert "config.json not found" in capsys.readouterr().err


def test_curves_and_samples_draw_without_data(tmp_path, world):
    from PIL import Image

    figures.draw_curves([], tmp_path / "c.png")
    figures.draw_samples(world, ["a red circle"] * 6, tmp_path / "s.png")
    # Both are real pictures, not empty files: images of some size with more than one colour.
    for name in ("c.png", "s.png"):
        with Image.open(tmp_path / name) as image:
            assert image.width >= 200 and image.height >= 100
            assert len(image.convert("L").getcolors(maxcolors=1 << 16) or range(2)) > 1


def _ddp_worker(rank: int, world_dir: str, runs_dir: str, port: int, sets: dict, runs: list,
                skew: bool) -> None:
    """One of 2 gloo processes: the tiny world, then each (name, stop_after, resume) of `runs`.
    With skew, rank r draws r extra numbers from torch's generator before each CgT-GAN step, so
    the ranks' random states (which the generator's dropout draws from) differ."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    from pathlib import Path

    torch.set_num_threads(1)
    world = tiny_world(Path(world_dir) / f"rank{rank}")
    if skew:
        step = train.gan_step
        train.gan_step = lambda *args: (torch.rand(rank), step(*args))[1]
    for name, stop_after, resume in runs:
        commands.run_train(tiny_config(runs_dir=runs_dir, name=name, **sets), world,
                           resume=resume, stop_after=stop_after)
    assert torch.distributed.get_world_size() == 2  # the run really joined the process group
    torch.distributed.destroy_process_group()


def _spawn_two_processes(tmp_path, sets: dict, runs: list, skew: bool = False) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(str(tmp_path / "worlds"), str(tmp_path), port, sets, runs, skew),
             nprocs=2)


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_two_process_ddp_matches_one_process(world, tmp_path, dropout):
    """torchrun-style data parallel (gloo, 2 CPU processes) gives the losses of one process with
    the same global batch: ranks share one draw of the random numbers, average their gradients,
    and the discriminator's dropout masks are seeded per group of images (train.discriminate;
    gan.d_groups=2, one group per process)."""
    sets = {"gan.batch": 4, "gan.steps": 3, "disc.dropout": dropout}
    commands.run_train(tiny_config(runs_dir=str(tmp_path), name="single", **sets), world)
    (tmp_path / "ddp").mkdir()
    shutil.copyfile(tmp_path / "single" / "init.pt", tmp_path / "ddp" / "init.pt")
    _spawn_two_processes(tmp_path, sets, [("ddp", None, False)])
    one, two = gan_losses(tmp_path / "single"), gan_losses(tmp_path / "ddp")
    print(f"disc.dropout={dropout}: (step, loss_g, d_loss) 1 process {one}; 2 processes {two}")
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), atol=1e-5, rtol=1e-5)


def test_procs_run_the_data_parallel_group_themselves(world, tmp_path):
    """procs=2: `train` forks its own 2-process group (data.in_processes), which computes what one
    process computes (as under torchrun) and returns rank 0's results."""
    sets = {"gan.batch": 4, "gan.steps": 3, "disc.dropout": 0.1, "threads": 1}
    one = commands.run_train(tiny_config(runs_dir=str(tmp_path), name="single", **sets), world)
    (tmp_path / "two").mkdir()
    shutil.copyfile(tmp_path / "single" / "init.pt", tmp_path / "two" / "init.pt")
    two = commands.run_train(tiny_config(runs_dir=str(tmp_path), name="two", procs=2, **sets), world)
    assert two["config"]["procs"] == 2 and two["test"].keys() == one["test"].keys()
    torch.testing.assert_close(torch.tensor(gan_losses(tmp_path / "two")),
                               torch.tensor(gan_losses(tmp_path / "single")), atol=1e-5, rtol=1e-5)
    assert not torch.distributed.is_initialized()  # the group lived in the workers only


def test_procs_errors_reach_the_command_line_as_themselves(world, tmp_path, monkeypatch):
    with pytest.raises(config.ConfigError, match="gan.batch \\(3\\) must be a multiple of the 2"):
        commands.run_train(tiny_config(runs_dir=str(tmp_path), procs=2, threads=1), world)

    def fail(run, *args, **kwargs):
        raise train.TrainingError(f"rank {run.rank} of {run.world_size} stopped")

    monkeypatch.setattr(train, "train_gan", fail)  # the forked workers inherit it
    cfg = tiny_config(runs_dir=str(tmp_path), name="fails", procs=2, threads=1, **{"gan.batch": 4})
    with pytest.raises(train.TrainingError, match="^rank [01] of 2 stopped$"):
        commands.run_train(cfg, world)

    def interrupt_or_die(run, *args, **kwargs):
        if run.rank == 1:
            raise KeyboardInterrupt if kill == "ctrl-c" else os._exit(9)  # as if killed
        torch.distributed.barrier()  # rank 0 waits for rank 1, which never comes

    monkeypatch.setattr(train, "train_gan", interrupt_or_die)
    for kill, error in (("ctrl-c", KeyboardInterrupt), ("exit", train.TrainingError)):
        with pytest.raises(error, match=None if kill == "ctrl-c" else "^a training process stopped"):
            commands.run_train(dataclasses.replace(cfg, name=kill), world)


@pytest.mark.slow
def test_two_process_resume_matches_uninterrupted(tmp_path):
    """2 processes stopped after 2 steps and resumed give the losses of 2 processes uninterrupted:
    last.pt holds every rank's random state, and each rank restores its own (the ranks' states
    differ here: the generator's dropout is on and the ranks draw differently, see skew)."""
    sets = {"gan.batch": 4, "gan.steps": 4, "disc.dropout": 0.1, "gen.dropout": 0.1}
    _spawn_two_processes(tmp_path, sets, [("full", None, False), ("part", 2, False),
                                          ("part", None, True)], skew=True)
    rng = torch.load(tmp_path / "part" / "last.pt", weights_only=True)["rng"]
    assert isinstance(rng, list) and len(rng) == 2, "last.pt must hold one random state per rank"
    full, part = gan_losses(tmp_path / "full"), gan_losses(tmp_path / "part")
    print(f"2 processes uninterrupted {full}; stopped after 2 steps and resumed {part}")
    torch.testing.assert_close(torch.tensor(part), torch.tensor(full), atol=1e-5, rtol=1e-5)


def test_cli_train_on_a_tiny_shapesworld(tmp_path, capsys, monkeypatch):
    """`python cgtgan.py train` end to end through the real CLI and the real ShapesWorld builder."""
    world = {"n_clip_pairs": 300, "n_clip_heldout": 60, "n_train": 40, "n_corpus": 150,
             "n_val": 8, "n_test": 12, "clip_steps": 3, "clip_batch_size": 32, "n_clip_closeups": 60,
             "clip_vision_layers": 1, "clip_text_layers": 1, "clip_embed_dim": 32,
             "root": str(tmp_path / "world")}
    sets = [f"world.{k}={v}" for k, v in world.items()]
    tiny = {"gen.n_layer": 1, "gen.n_embd": 32, "gen.n_head": 2, "gen.prefix_len": 2,
            "disc.n_layer": 1, "disc.hidden": 32, "disc.n_head": 2, "init.steps": 5,
            "init.batch": 8, "gan.steps": 3, "gan.batch": 4, "gan.k": 2, "gan.eval_every": 2,
            "runs_dir": str(tmp_path / "runs")}
    sets += [f"{k}={v}" for k, v in tiny.items()]
    argv = ["train", "--seed", "1"] + [a for s in sets for a in ("--set", s)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "retrieval (nearest corpus sentence)" in out and "CgT-GAN (agg+gan)" in out
    (run_dir,) = (tmp_path / "runs").glob("shapesworld_seed1_*")  # the tiny settings' digest
    for name in ("config.json", "init.pt", "last.pt", "best.pt", "metrics.jsonl", "results.json",
                 "samples.png", "curves.png"):
        assert (run_dir / name).is_file(), name
    assert cli.main(["eval", "--run", str(run_dir), "--split", "val", "--fast"]) == 0
    # procs=2 on 2 threads each: spawned workers, which load the world the parent built.
    capsys.readouterr()
    assert cli.main(argv + ["--name", "two", "--set", "procs=2", "--set", "threads=2"]) == 0
    assert json.loads((tmp_path / "runs" / "two" / "results.json").read_text())["config"]["procs"] == 2
    assert cli.main(argv[:1] + ["--set", "world.nope=1"]) == 2
    assert "unknown config key 'world.nope'" in capsys.readouterr().err
    # The docs' diagnostic scripts read the same run folder (findings 10 and 11).
    for script, expect in (("fact_split", "best.pt: "), ("size_rewards", "CLIP-agg: best size")):
        spec = importlib.util.spec_from_file_location(
            script, Path(__file__).resolve().parents[1] / "docs" / f"{script}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        monkeypatch.setattr("sys.argv", [script, str(run_dir)])
        module.main()
        assert expect in capsys.readouterr().out, script


def test_script_errors_are_one_line(trained, tmp_path):
    """`python cgtgan.py ...` as a script (module __main__) still turns errors into one line."""
    import subprocess
    import sys
    from pathlib import Path

    cfg, run_dir, _ = trained
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "cgtgan.py"), "caption",
                           str(tmp_path / "missing.png"), "--run", str(run_dir)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"error: image file {tmp_path / 'missing.png'} not found"


def test_reward_lambda_per_reward_and_baseline_layout():
    gan = config.GANConfig(lambda_hold=10, lambda_ramp=20, lambda_final=0.5)
    # CgT-GAN: the schedule; each ablation: its one reward at full weight.
    assert [train.reward_lambda(gan, s) for s in (0, 10, 20, 30, 99)] == [0.0, 0.0, 0.25, 0.5, 0.5]
    for reward, lam in (("cos", 1.0), ("agg", 1.0), ("gan", 0.0)):
        assert train.reward_lambda(dataclasses.replace(gan, reward=config.Reward(reward)), 20) == lam
    # B*K samples (image-major) then B greedy captions -> (B, K+1): each image's own K samples,
    # then its own greedy caption, so every reward is compared with its own image's baseline.
    rows = torch.tensor([0, 1, 10, 11, 20, 21, 100, 110, 120])  # B=3, K=2: image b's are b*10 + k
    assert train.with_baseline(rows, 3, 2).tolist() == [[0, 1, 100], [10, 11, 110], [20, 21, 120]]


def test_discriminator_dropout_depends_on_each_groups_seed_alone(world):
    """With dropout on, a dropout group's logits are the same whichever process computes it (one
    process: every group; process r of 2: its own group, the other's rows absent) and change with
    its own seed alone: what makes 2 processes equal 1 (test_two_process_ddp_matches_one_process)."""
    run = runs.build_run(tiny_config(**{"disc.dropout": 0.5}), world, with_clip=False)
    run.discriminator.train()
    texts = world.corpus[:5]  # group 0: rows 0, 1, 4; group 1: rows 2, 3
    group_of_row, seeds = torch.tensor([0, 0, 1, 1, 0]), torch.tensor([11, 22])
    both = train.discriminate(run, texts, group_of_row, seeds)
    for rows in ([0, 1, 4], [2, 3]):  # each process's rows, with every group's seed
        alone = train.discriminate(run, [texts[i] for i in rows], group_of_row[rows], seeds)
        torch.testing.assert_close(alone, both[rows])
    again = train.discriminate(run, texts, group_of_row, torch.tensor([11, 23]))
    torch.testing.assert_close(again[[0, 1, 4]], both[[0, 1, 4]])
    assert not torch.allclose(again[[2, 3]], both[[2, 3]])
    # Dropout really is drawn per group: one forward for all rows under seed 11 gives other
    # logits for group 1's rows (and group 0's, whose masks are drawn over a wider tensor).
    one = train.discriminate(run, texts, torch.zeros(5, dtype=torch.long), seeds[:1])
    assert not torch.allclose(one[[2, 3]], both[[2, 3]])


def test_each_process_draws_whole_groups_and_every_seed(world):
    """draw_batch, as rank r of 2 processes, keeps the groups of its own images (consecutive
    halves of the batch with gan.d_groups=2) and every group's seed, as one process draws them."""
    run = runs.build_run(tiny_config(**{"gan.batch": 4, "disc.dropout": 0.1}), world,
                         with_clip=False)
    targets = train.agg_targets(run)
    one = train.draw_batch(run, targets, torch.Generator().manual_seed(3))
    assert one.group.tolist() == [0, 0, 1, 1] and len(one.seeds) == 2
    for rank in (0, 1):
        view = dataclasses.replace(run, rank=rank, world_size=2)
        mine = train.draw_batch(view, targets, torch.Generator().manual_seed(3))
        assert torch.equal(mine.seeds, one.seeds)
        assert mine.group.tolist() == [rank, rank]
        assert mine.real == one.real[rank * 4:(rank + 1) * 4]


@pytest.mark.parametrize("groups", [1, 3])
def test_groups_change_nothing_without_dropout(world, groups):
    """disc.dropout=0: gan.d_groups changes no logit, loss or update of a CgT-GAN step (one
    forward either way); with dropout on, other groups give other masks."""
    def step(dropout: float, d_groups: int):
        run = runs.build_run(tiny_config(**{"disc.dropout": dropout, "gan.d_groups": d_groups}),
                             world)
        opt_g, opt_d = (train.adamw(m, 1e-3, 0.0) for m in (run.generator, run.discriminator))
        batch = train.draw_batch(run, train.agg_targets(run), torch.Generator().manual_seed(0))
        stats = train.gan_step(run, opt_g, opt_d, batch, 5)
        return stats, [p.detach().clone() for p in run.discriminator.parameters()]

    (stats, params), (base_stats, base_params) = step(0.0, groups), step(0.0, 2)
    assert stats == base_stats
    assert all(torch.equal(p, q) for p, q in zip(params, base_params))
    if groups == 3:
        assert step(0.3, 3)[0]["d_loss"] != step(0.3, 1)[0]["d_loss"]


def test_groups_that_processes_cannot_split_are_refused():
    cfg = tiny_config(**{"disc.dropout": 0.1, "gan.batch": 12, "gan.d_groups": 4})
    for world_size in (1, 2, 4):
        config.check_world_size(cfg, world_size)
    with pytest.raises(config.ConfigError, match=r"^gan.d_groups \(4\) must be a multiple of the "
                                                 r"3 data-parallel processes.*gan.d_groups=3"):
        config.check_world_size(cfg, 3)
    with pytest.raises(config.ConfigError, match=r"^gan.batch \(12\) must be a multiple of the 5"):
        config.check_world_size(cfg, 5)
    # Without dropout the groups change nothing (test_groups_change_nothing_without_dropout).
    no_dropout = dataclasses.replace(cfg, disc=dataclasses.replace(cfg.disc, dropout=0.0))
    config.check_world_size(no_dropout, 3)


def test_groups_split_at_every_processes_boundary():
    """Image i is in group floor(i G / B): with G not dividing B the groups differ in size by one,
    and the shard of each of W processes (W dividing G and B) holds whole groups."""
    for b, g, w in ((6, 4, 2), (12, 4, 4), (9, 3, 3), (3, 2, 1), (10, 2, 2)):
        group = (torch.arange(b) * g // b).tolist()
        sizes = [group.count(i) for i in range(g)]
        assert max(sizes) - min(sizes) <= 1 and group == sorted(group)
        shards = [set(group[r * b // w:(r + 1) * b // w]) for r in range(w)]
        assert all(not (a & c) for i, a in enumerate(shards) for c in shards[i + 1:]), (b, g, w)


def test_ablation_reuses_the_train_runs_init(world, trained, tmp_path, capsys):
    # `train --ablation` after `train` with the same settings starts from that run's init.pt
    # (copied, byte for byte) instead of training the same initialisation again.
    cfg, trained_dir, _ = trained
    cfg = dataclasses.replace(cfg, runs_dir=str(tmp_path))  # a folder no other test touched
    run_dir = tmp_path / trained_dir.name
    run_dir.mkdir()
    shutil.copyfile(trained_dir / "init.pt", run_dir / "init.pt")
    commands.run_ablation(cfg, world)
    base = run_dir.with_name(run_dir.name + "_ablation")
    assert (base / "init.pt").read_bytes() == (run_dir / "init.pt").read_bytes()
    assert "reusing the text-only initialisation of" in capsys.readouterr().out
    logged = (base / "metrics.jsonl").read_text() if (base / "metrics.jsonl").exists() else ""
    assert '"stage": "init"' not in logged


def test_discriminator_cuts_sentences_longer_than_its_positions(world):
    # A corpus sentence longer than the small RoBERTa's 64 positions (as a small BPE vocabulary
    # makes them) is cut to 64 tokens, "." and </s> last, instead of overrunning the positions.
    long = " ".join(["a small red circle above a blue square"] * 12)
    data = dataclasses.replace(world, corpus=[long] + list(world.corpus[1:]))
    run = runs.build_run(tiny_config(), data)
    assert run.disc_max_tokens == run.discriminator.roberta.config.max_position_embeddings - 2 == 64
    ids, lengths = run.corpus_roberta
    assert lengths[0] == 64 and len(run.roberta_tokenizer(long)["input_ids"]) > 64
    run.discriminator.eval()
    logits = train.discriminate(run, [long, "a red circle"], torch.zeros(2, dtype=torch.long),
                                torch.zeros(1, dtype=torch.long))
    assert logits.shape == (2,) and torch.isfinite(logits).all()
