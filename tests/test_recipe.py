"""The official recipe, item by item: the presets against the authors' code, the `config` command
and its differences table, and each recipe item the presets switch on (shuffled epochs, learning-rate
warm-up, weight decay groups, raw CLIP embeddings, the pooler head, 22-token RoBERTa inputs), tested
on the tiny synthetic world of test_cgtgan.py and the paper-scale fixture of fixtures.py. The
ShapesWorld defaults leave every one of them off.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import cgtgan
import cli
import commands
import config
import data
import realdata
import runs
import train
from fixtures import build_paperscale_fixture
from test_cgtgan import tiny_config, tiny_world
from test_paperscale import cli as run_cli
from test_paperscale import real_options, sets

ROOT = Path(__file__).resolve().parents[1]
NO_DECAY = "bias,LayerNorm.weight"

# The official code's recipe, transcribed from /work/shared/reference/official_recipe.md (section
# numbers in the comments) and, where it is silent, from the code it summarises (Lihr747/CgtGAN:
# initialization.py does not clip gradients; GPT-2 and RoBERTa-base ship dropout 0.1; torch 1.11
# ran CUDA matrix multiplies in TF32 by default).
OFFICIAL_RECIPE = {
    "real.clip": "ViT-L/14", "gen.normalize_prefix": False,  # 1.2: ViT-L/14, not normalised
    "gen.prefix_len": 10, "gen.mapping_hidden": 0,  # 1.2: 10 prefix tokens, hidden 768*10/2
    "gen.max_len": 20, "gen.end_token": ".", "decode": "greedy",  # 1.2: "." ends, 20 tokens
    "gen.dropout": 0.1, "disc.dropout": 0.1,  # the released models' configs, in train mode
    "disc.head": "pooler", "disc.max_tokens": 22,  # 1.3: pooler -> 768 -> 384 -> 1; 22 tokens
    "gan.reward": "agg+gan", "gan.agg_weight": 1.0, "gan.agg_raw": True,  # 1.4: clip_weight 0
    "gan.k": 5, "gan.baseline": "greedy",  # 1.5: 5 samples, greedy baseline
    "gan.lambda_hold": 150, "gan.lambda_ramp": 2350, "gan.lambda_final": 0.5,  # 1.6
    "init.epochs": 1, "init.batch": 16, "init.lr": 2e-5, "init.warmup": 5000,  # 1.7
    "init.weight_decay": 0.05, "init.noise": 0.0, "init.no_decay": NO_DECAY,  # 1.7
    "init.grad_clip": 0.0,  # initialization.py
    "gan.lr": 1e-5, "gan.d_lr": 1e-5, "gan.weight_decay": 0.05, "gan.no_decay": NO_DECAY,  # 1.8
    "gan.warmup": 150, "gan.grad_clip": 1.0, "gan.batch": 128,  # 1.8: 64 per GPU on 2 GPUs
    "gan.eval_every": 0, "gan.eval_images": 0, "seed": 0,  # 1.8: val CIDEr after each epoch
    "real.lowercase": False, "real.strip_period": False, "real.dedupe": False,  # 1.9
    "real.min_words": 1, "real.max_words": 1000,  # 1.9: no length filter
    "tf32": True, "bf16": False,
}
# 1.4's temperatures and 1.8's epochs (80 with the GCC corpus), per preset.
OFFICIAL_PER_PRESET = {"coco": (100.0, 50), "flickr30k": (125.0, 50),
                       "coco-shutterstock": (100.0, 50), "coco-flickr30k": (125.0, 50),
                       "flickr30k-coco": (125.0, 50), "coco-gcc": (175.0, 80),
                       "zsic": (175.0, 80)}


def preset(preset_name: str, **overrides) -> config.Config:
    return config.apply_overrides(
        config.apply_overrides(config.Config(), config.PRESETS[preset_name]), overrides)


# ----------------------------------------------------------------------------------------------
# The presets are the official recipe; what differs is documented


@pytest.mark.parametrize("name", sorted(config.PRESETS))
def test_preset_values_are_the_official_ones(name):
    assert set(OFFICIAL_PER_PRESET) == set(config.PRESETS)
    ours = config.flat_dict(config.config_dict(preset(name)))
    t, epochs = OFFICIAL_PER_PRESET[name]
    for key, official in {**OFFICIAL_RECIPE, "gan.temperature": t, "gan.epochs": epochs}.items():
        if key in config.DIFFERENCES:
            assert config.DIFFERENCES[key][:2] == (official, ours[key]), key
        else:
            assert ours[key] == official, f"{name}: {key} is {ours[key]!r}, official {official!r}"


def test_the_differences_table_agrees_with_the_recipe():
    # config.OFFICIAL is the code's own copy of the recipe: the same values as the transcription.
    assert {k: v for k, v in config.OFFICIAL.items() if k in OFFICIAL_RECIPE} == \
        {k: v for k, v in OFFICIAL_RECIPE.items() if k in config.OFFICIAL}
    for key, (official, ours, why) in config.DIFFERENCES.items():
        assert official == OFFICIAL_RECIPE[key] and official != ours and len(why) > 40, key
    # A preset differs from the official code exactly where DIFFERENCES says, for its reasons.
    for name in config.PRESETS:
        rows = config.differences(preset(name))
        assert {key for key, *_ in rows} == set(config.DIFFERENCES), name
        assert all(why == config.DIFFERENCES[key][2] for key, _, _, why in rows)


def test_differences_name_a_set_value_and_the_shapesworld_defaults():
    rows = {key: why for key, _, _, why in config.differences(preset("coco", **{"gan.lr": "1e-4"}))}
    assert rows["gan.lr"] == "changed from the preset (--set)"
    rows = {key: (official, ours, why) for key, official, ours, why in
            config.differences(config.Config())}
    assert rows["gan.batch"][:2] == (128, 16) and "ShapesWorld" in rows["gan.batch"][2]
    assert rows["gen.normalize_prefix"][:2] == (False, True) and "gan.agg_raw" in rows


def test_flickr30k_images_with_coco_captions():
    cfg = preset("flickr30k-coco")
    assert cfg.real.split_file.endswith("dataset_flickr30k.json")
    assert cfg.real.corpus.endswith("coco_captions.txt") and cfg.real.setting == "flickr30k/coco"
    assert config.AGG_TEMPERATURE["flickr30k/coco"] == cfg.real.temperature() == 125.0


def test_config_command_prints_json_and_the_differences(capsys):
    assert cli.main(["config", "--preset", "coco", "--set", "gan.lr=1e-4"]) == 0
    out = capsys.readouterr().out
    resolved, table = out.split("\n\nsettings that differ from the official code", 1)
    cfg = config.config_from_dict(json.loads(resolved))
    # A setting changed from the preset gets its own run folder (config.run_name).
    assert cfg.name.startswith("coco_seed0_") and len(cfg.name) == len("coco_seed0_") + 6
    assert cfg == preset("coco", **{"gan.lr": "1e-4"}, name=cfg.name)
    assert table.startswith(" (Lihr747/CgtGAN): 3\n")
    lines = table.splitlines()
    for key, (official, ours, why) in config.DIFFERENCES.items():
        assert any(line.startswith(key) and repr(official) in line and why in line for line in lines)
    assert any(line.startswith("gan.lr ") and "1e-05" in line and "0.0001" in line for line in lines)
    for what, *_ in config.BEHAVIOUR_DIFFERENCES:
        assert f"- {what}: official " in table


def test_config_command_imports_no_torch_and_refuses_a_bad_preset():
    code = ("import sys, cli; rc = cli.main(['config', '--preset', 'zsic']); "
            "sys.exit(rc or ('torch' in sys.modules) * 3)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "cgtgan.py", "config", "--preset", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "unknown preset 'nope'" in proc.stderr


# ----------------------------------------------------------------------------------------------
# Batches: global, shuffled epochs, warm-up, weight decay groups


def test_gan_batch_is_global_whatever_the_process_count():
    for world_size in (1, 2, 4):
        rows = [train.shard(SimpleNamespace(rank=r, world_size=world_size), 128)
                for r in range(world_size)]
        assert [r.stop - r.start for r in rows] == [128 // world_size] * world_size
        assert rows[0].start == 0 and rows[-1].stop == 128


def test_epoch_rows_visit_every_item_once_per_epoch():
    g = torch.Generator().manual_seed(0)
    order, seen = None, []
    for step in range(6):  # 7 items in batches of 3: two batches per epoch, one item left out
        rows, order = train.epoch_rows(step, 7, 3, g, order)
        seen.append(rows.tolist())
    epochs = [sum(seen[i:i + 2], []) for i in (0, 2, 4)]
    assert all(len(set(e)) == 6 and set(e) < set(range(7)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]  # a fresh order each epoch
    assert train.total_steps(config.GANConfig(epochs=3, batch=3), 7) == 6
    assert train.total_steps(config.GANConfig(steps=11), 7) == 11
    with pytest.raises(config.ConfigError, match="an epoch of 2 items holds no batch of 3"):
        train.total_steps(config.GANConfig(epochs=1, batch=3), 2)


def test_warmup_lr_is_linear_then_constant():
    assert [train.warmup_lr(1e-5, s, 150) for s in (0, 75, 150, 1000)] == [0.0, 5e-6, 1e-5, 1e-5]
    assert train.warmup_lr(2e-5, 0, 0) == 2e-5


def test_adamw_leaves_biases_and_layernorm_weights_undecayed(world):
    tok = cgtgan.load_tokenizer(world.roberta_path, "RoBERTa")
    disc = cgtgan.build_discriminator(config.DiscriminatorConfig(head="pooler"), tok)
    names = {id(p): n for n, p in disc.named_parameters()}
    decay, exempt = train.adamw(disc, 1e-5, 0.05, NO_DECAY).param_groups
    assert decay["weight_decay"] == 0.05 and exempt["weight_decay"] == 0.0
    assert all(names[id(p)].endswith(("bias", "LayerNorm.weight")) for p in exempt["params"])
    assert not any(names[id(p)].endswith(("bias", "LayerNorm.weight")) for p in decay["params"])
    assert len(decay["params"]) + len(exempt["params"]) == len(names)
    (only,) = train.adamw(disc, 1e-5, 0.05).param_groups  # the ShapesWorld default: one group
    assert only["weight_decay"] == 0.05 and len(only["params"]) == len(names)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory.mktemp("tiny_world_recipe"))


def epoch_config(tmp_path, name, **overrides) -> config.Config:
    """The tiny run in shuffled epochs: 24 images in batches of 6, 2 epochs of 4 steps, with
    validation after each epoch and G's learning rate warmed up over 3 steps."""
    return tiny_config(runs_dir=str(tmp_path), name=name, **{
        "gan.epochs": 2, "gan.batch": 6, "gan.eval_every": 0, "gan.warmup": 3,
        "gan.no_decay": NO_DECAY, "init.epochs": 1, "init.batch": 20, "init.warmup": 2,
        "init.grad_clip": 0.0, "init.no_decay": NO_DECAY, **overrides})


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_shuffled_epochs_and_warmups(world, tmp_path, monkeypatch):
    """Each epoch's 4 batches hold every image once; validation runs after each epoch; the
    learning rates warm up (G's, the initialisation's), D's does not, and the initialisation
    clips nothing (init.grad_clip=0)."""
    seen, lrs, draw, update = [], [], train.draw_batch, train.update

    def spy_draw(run, targets, generator, images=None):
        seen.append(images.tolist())
        return draw(run, targets, generator, images)

    def spy_update(run, opt, module, loss, grad_clip):
        lrs.append((module is run.generator, opt.param_groups[0]["lr"], grad_clip))
        return update(run, opt, module, loss, grad_clip)

    monkeypatch.setattr(train, "draw_batch", spy_draw)
    monkeypatch.setattr(train, "update", spy_update)
    commands.run_train(epoch_config(tmp_path, "epochs"), world, stop_after=8)
    assert len(seen) == 8 and all(len(b) == 6 for b in seen)
    for epoch in (seen[:4], seen[4:]):
        assert sorted(sum(epoch, [])) == list(range(24))
    log = records(tmp_path / "epochs")
    assert [r["step"] for r in log if r["stage"] == "init"] == [1, 2, 3]  # 60 sentences // 20
    # After each epoch (stop_after skips the final validation and the test table).
    assert [r["step"] for r in log if "val_CIDEr-D" in r] == [0, 4]
    init, gan = lrs[:3], lrs[3:]
    assert [lr for _, lr, _ in init] == pytest.approx([0.0, 1e-3, 2e-3])
    assert {clip for _, _, clip in init} == {0.0}
    assert [lr for is_g, lr, _ in gan if is_g] == pytest.approx([0, 1e-4 / 3, 2e-4 / 3] + [1e-4] * 5)
    assert {(lr, clip) for is_g, lr, clip in gan if not is_g} == {(1e-3, 1.0)}


def test_shuffled_epochs_resume_mid_epoch(world, tmp_path):
    """2 epochs of 2 batches of 12: stopped after the first step, resumed, the same losses."""
    commands.run_train(epoch_config(tmp_path, "full", **{"gan.batch": 12}), world, stop_after=4)
    part = epoch_config(tmp_path, "part", **{"gan.batch": 12})
    commands.run_train(part, world, stop_after=1)
    assert torch.load(tmp_path / "part" / "last.pt", weights_only=True)["order"].shape == (24,)
    commands.run_train(part, world, resume=True, stop_after=4)
    losses = [[(r["step"], r["loss_g"]) for r in records(tmp_path / d) if "loss_g" in r]
              for d in ("full", "part")]
    assert len(losses[0]) == 4
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]))


# ----------------------------------------------------------------------------------------------
# The discriminator: the official pooler head and 22-token inputs


def test_roberta_inputs_cut_long_texts_with_a_period(world):
    tok = cgtgan.load_tokenizer(world.roberta_path, "RoBERTa")
    texts = ["a red circle", "a red circle above a blue square below a green star left of a star"]
    plain = tok(texts, padding=True, return_tensors="pt")
    ids, mask = cgtgan.roberta_inputs(tok, texts)
    assert torch.equal(ids, plain["input_ids"]) and torch.equal(mask, plain["attention_mask"])
    ids, mask = cgtgan.roberta_inputs(tok, texts, max_tokens=6)
    (dot,) = tok.encode(".", add_special_tokens=False)
    full = tok(texts[1])["input_ids"]
    assert ids[1].tolist() == full[:4] + [dot, tok.eos_token_id] and mask[1].sum() == 6
    assert ids[0].tolist()[:len(tok(texts[0])["input_ids"])] == tok(texts[0])["input_ids"]


def test_pooler_head_reads_robertas_pooler(world):
    tok = cgtgan.load_tokenizer(world.roberta_path, "RoBERTa")
    torch.manual_seed(0)
    disc = cgtgan.build_discriminator(config.DiscriminatorConfig(head="pooler", dropout=0.0), tok)
    assert [m.out_features for m in disc.head if isinstance(m, torch.nn.Linear)] == [32, 1]
    ids, mask = cgtgan.roberta_inputs(tok, ["a red circle", "a blue star"])
    out = disc.roberta(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(disc(ids, mask), disc.head(out.pooler_output).squeeze(-1))
    disc(ids, mask).sum().backward()
    assert all(p.grad is not None for p in disc.parameters())  # the pooler is trained too


# ----------------------------------------------------------------------------------------------
# Raw CLIP embeddings: the mapper's input, the CLIP-agg target and its L1 term


def with_norms(world, seed=0):
    """The tiny world with norms stored beside its unit rows, as real data keeps them."""
    g = torch.Generator().manual_seed(seed)
    norm = lambda n: 5 + 10 * torch.rand(n, generator=g)  # noqa: E731
    splits = {k: dataclasses.replace(s, norms=norm(len(s.ids))) for k, s in world.splits.items()}
    return dataclasses.replace(world, train_norms=norm(len(world.train_ids)),
                               corpus_norms=norm(len(world.corpus)), splits=splits).validate()


def test_clip_agg_target_sums_raw_sentence_embeddings(world):
    raw = data.raw_rows(world.corpus_feats, with_norms(world).corpus_norms, "test").double()
    image = world.train_feats.double()
    weights = (100 * F.normalize(image, dim=-1) @ F.normalize(raw, dim=-1).T).softmax(-1)
    got = cgtgan.clip_agg_target(world.train_feats, raw, 100.0, image_chunk=5, corpus_chunk=7,
                                 raw=True)
    torch.testing.assert_close(got.double(), weights @ raw, atol=1e-5, rtol=1e-5)
    # Unit sentences sum to the default target: raw only changes what is summed.
    torch.testing.assert_close(cgtgan.clip_agg_target(world.train_feats, world.corpus_feats, 100.0,
                                                      raw=True),
                               cgtgan.clip_agg_target(world.train_feats, world.corpus_feats, 100.0))


def test_clip_agg_reward_raw_l1_compares_raw_vectors():
    a = torch.tensor([[3.0, 4.0]])  # norm 5
    c = torch.tensor([[[0.6, 0.8], [3.0, 4.0]]])  # the same direction, norms 1 and 5
    raw = cgtgan.clip_agg_reward(a, c, raw=True)
    # cos = 1 for both; L1 = mean(|3 - 0.6|, |4 - 0.8|) = 2.8 for the first, 0 for the second.
    torch.testing.assert_close(raw, torch.tensor([[50 + 50 * (1 - 2.8), 100.0]]))
    torch.testing.assert_close(cgtgan.clip_agg_reward(a, c), torch.tensor([[100.0, 100.0]]))


def test_raw_prefix_needs_stored_norms(world):
    gen = config.GeneratorConfig(normalize_prefix=False)
    with pytest.raises(data.DataError, match="gen.normalize_prefix=false reads raw corpus text "
                                             "embeddings, but this dataset stores unit"):
        train.prefix_input(gen, world.corpus_feats, world.corpus_norms, "corpus text embeddings")
    rich = with_norms(world)
    raw = train.prefix_input(gen, rich.corpus_feats, rich.corpus_norms, "corpus")
    torch.testing.assert_close(raw.norm(dim=-1), rich.corpus_norms)
    assert train.prefix_input(config.GeneratorConfig(), rich.corpus_feats, None, "x") is \
        rich.corpus_feats


def test_raw_run_feeds_raw_embeddings_and_raw_rewards(world, tmp_path, monkeypatch):
    rich = with_norms(world)
    cfg = tiny_config(runs_dir=str(tmp_path), **{"gen.normalize_prefix": False,
                                                 "gan.agg_raw": True})
    seen = {}
    step = train.gan_step

    def spy(run, opt_g, opt_d, batch, n):
        seen.setdefault("feats", batch.feats)
        seen.setdefault("targets", batch.agg_targets)
        seen["clip_text"] = run.clip_text
        return step(run, opt_g, opt_d, batch, n)

    monkeypatch.setattr(train, "gan_step", spy)
    commands.run_train(cfg, rich, stop_after=cfg.gan.steps)
    norms = seen["feats"].norm(dim=-1)
    assert norms.min() > 4 and not torch.allclose(norms, torch.ones_like(norms))
    assert seen["clip_text"].normalize is False
    raw_corpus = data.raw_rows(rich.corpus_feats, rich.corpus_norms, "test")
    expected = cgtgan.clip_agg_target(rich.train_feats, raw_corpus, 100.0, raw=True)
    assert any(torch.allclose(t, expected[i]) for t in seen["targets"] for i in range(24))
    with pytest.raises(data.DataError, match="gan.agg_raw=true sums raw corpus embeddings"):
        train.agg_targets(runs.build_run(cfg, world, with_clip=False))


# ----------------------------------------------------------------------------------------------
# Paper scale: norms in the caches, the preset end to end, models that must be loaded


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_paperscale_fixture(tmp_path_factory.mktemp("recipe_fixture"))


def test_prepare_stores_norms_and_raw_targets(fx, tmp_path):
    cfg = fx.config(cache_dir=str(tmp_path / "cache"))
    summary = realdata.prepare(cfg, agg_raw=True)
    assert summary["agg_raw"] is True
    ds = realdata.load_real_data(cfg, agg_raw=True)
    assert ds.agg_raw and ds.corpus_norms.shape == (len(ds.corpus),)
    clip, _ = commands.clip_model.load(fx.clip)
    from clip_tokenizer import Tokenizer, tokenize

    with torch.no_grad():
        text = clip.encode_text(tokenize(ds.corpus[:4], clip.config.context_length,
                                         tokenizer=Tokenizer(fx.clip_bpe)))
    torch.testing.assert_close(ds.corpus_norms[:4], text.norm(dim=-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(data.raw_rows(ds.corpus_feats[:4], ds.corpus_norms[:4], "t"),
                               text, rtol=2e-3, atol=2e-3)  # fp16 unit rows
    raw = data.raw_rows(ds.corpus_feats, ds.corpus_norms, "test")
    expected = cgtgan.clip_agg_target(ds.train_feats, raw, 100.0, raw=True)
    torch.testing.assert_close(ds.train_agg_targets, expected, rtol=2e-3, atol=2e-3)
    assert all(s.norms is not None and s.norms.min() > 0 for s in ds.splits.values())
    # The unit targets are another cache file: asking for them without preparing them is refused.
    with pytest.raises(data.DataError, match="CLIP-agg targets .* are missing"):
        realdata.load_real_data(cfg)


def test_coco_preset_trains_on_the_fixture_in_epochs(fx, tmp_path):
    """The coco preset as it is (epochs, warm-ups, raw embeddings, pooler head, 22 tokens), with
    only batches small enough for the fixture's 8 training images and 40 captions."""
    options = {**real_options(fx, tmp_path / "cache"), "runs_dir": tmp_path / "runs",
               "init.batch": 16, "init.warmup": 1, "gan.batch": 4, "gan.k": 2, "gan.epochs": 2,
               "gan.warmup": 1, "gen.max_len": 8}
    argv = ["--preset", "coco"] + sets(options)
    for command in (["prepare"], ["train", "--name", "coco"]):
        code, out, err = run_cli(command + argv)
        assert code == 0, err
    log = records(tmp_path / "runs" / "coco")
    assert [r["step"] for r in log if r["stage"] == "init"] == [1, 2]  # 40 captions // 16
    assert [r["step"] for r in log if "val_CIDEr-D" in r] == [0, 2, 4]  # after each epoch
    blob = torch.load(tmp_path / "runs" / "coco" / "best.pt", weights_only=True)
    assert any(k.startswith("roberta.pooler.") for k in blob["discriminator"])
    assert "CgT-GAN (agg+gan)" in out


def test_weightless_model_folder_is_refused_for_real_data(fx, tmp_path):
    """A GPT-2 or RoBERTa folder with tokenizer files but no weights stops a paper-scale run in
    one line naming the folder, instead of a small random model."""
    from transformers.utils import logging as hf_logging

    cache = tmp_path / "cache"
    assert run_cli(["prepare"] + sets(real_options(fx, cache)))[0] == 0
    hf_logging.disable_progress_bar()  # GPT-2 loads before RoBERTa is refused: no bar on stderr
    for model, what, repo in (("gpt2", "GPT-2", "gpt2"), ("roberta", "RoBERTa", "roberta-base")):
        folder = tmp_path / f"{model}_tokenizer_only"
        folder.mkdir()
        for f in getattr(fx, model).iterdir():
            if f.name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                          "special_tokens_map.json"):
                (folder / f.name).write_bytes(f.read_bytes())
        options = {**real_options(fx, cache), f"real.{model}": folder, "runs_dir": tmp_path}
        code, out, err = run_cli(["train"] + sets(options))
        assert code == 2 and err.count("\n") == 1, err
        assert f"{what} not found at '{folder}' (the folder holds no weights" in err
        assert f"`hf download {repo} --local-dir {folder}`" in err
    hf_logging.enable_progress_bar()
