"""Tests of review findings: each failed before its fix.

Beam search returned unfinished prefixes, a changed discriminator broke the reuse of init.pt, a
pretrained RoBERTa ignored disc.dropout, configs were checked only when a run had started, decoding
depended on one transformers version's defaults, and `caption` and Ctrl-C ended in tracebacks.
Tiny models on the synthetic world of test_cgtgan.py.
"""
from __future__ import annotations

import inspect
import io
import json
import re
import shlex
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import cli
import commands
import config
import decoding
import runs
import train
from cgtgan import (CaptionGenerator, MappingNetwork, build_discriminator, decode_captions,
                    load_tokenizer)
from config import DiscriminatorConfig
from test_cgtgan import tiny_config, tiny_gpt2, tiny_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory.mktemp("tiny_world_fixes"))


@pytest.fixture(scope="module")
def short_run(world, tmp_path_factory):
    """A run folder stopped after three CgT-GAN steps: config.json, init.pt, last.pt, best.pt
    (step 2's validation)."""
    cfg = tiny_config(runs_dir=str(tmp_path_factory.mktemp("runs")), name="short")
    commands.run_train(cfg, world, stop_after=3)
    return runs.run_dir_for(cfg)


# ----------------------------------------------------------------------------------------------
# Beam search returns finished captions (or ones cut at max_len), never a shorter prefix


class ScriptedGPT(nn.Module):
    """A stand-in for GPT-2 whose next-token distribution is a table: tokens so far -> probs (V,).

    The beam search embeds tokens with `transformer.wte` and reads `logits[:, -1]`; the embedding
    here remembers the tokens it was given, and the logits are the table's log-probabilities.
    """

    def __init__(self, table: dict[tuple, list[float]], vocab: int, width: int = 4):
        super().__init__()
        self.table, self.vocab, self.width = table, vocab, width
        self.transformer = SimpleNamespace(wte=self._embed)
        self.tokens = None

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens = tokens  # (b, t)
        return torch.zeros(*tokens.shape, self.width)  # (b, t, E)

    def forward(self, inputs_embeds: torch.Tensor):
        uniform = [1 / self.vocab] * self.vocab
        probs = torch.tensor([self.table.get(tuple(row), uniform) for row in self.tokens.tolist()])
        logits = probs.log()[:, None].expand(-1, inputs_embeds.shape[1], -1)  # (b, P+t, V)
        return SimpleNamespace(logits=logits)


def scripted_generator(table: dict, max_len: int) -> CaptionGenerator:
    """Tokens: 0 is the end token, 1-3 are words."""
    return CaptionGenerator(MappingNetwork(2, 4, prefix_len=1), ScriptedGPT(table, vocab=4),
                            end_id=0, max_len=max_len)


def test_beam_search_never_returns_an_unfinished_prefix():
    # Step 1 keeps beams [1] (log 0.5) and [2] (log 0.4). At step 2 both beams' best
    # continuations are the end token, so two captions finish and the search stops. The beams
    # [1] and [2] of the step before are prefixes, not captions: [1] (score -0.69 per token)
    # beat [1, 0] (-0.95 per token) when they were counted.
    table = {(): [0.05, 0.5, 0.4, 0.05], (1,): [0.3, 0.7 / 3, 0.7 / 3, 0.7 / 3],
             (2,): [0.3, 0.7 / 3, 0.7 / 3, 0.7 / 3]}
    gen = scripted_generator(table, max_len=5)
    ids, mask = gen.beam_search(torch.zeros(1, 2), beams=2)
    assert ids[0, :int(mask[0].sum())].tolist() == [1, 0]


def test_beam_search_keeps_captions_cut_at_max_len():
    # The end token is never likely: the beams cut at max_len are the only candidates.
    table = {(): [0.01, 0.9, 0.05, 0.04], (1,): [0.01, 0.05, 0.9, 0.04],
             (1, 2): [0.01, 0.04, 0.05, 0.9]}
    gen = scripted_generator(table, max_len=3)
    ids, mask = gen.beam_search(torch.zeros(1, 2), beams=2)
    assert ids[0, :int(mask[0].sum())].tolist() == [1, 2, 3]


# ----------------------------------------------------------------------------------------------
# A run folder whose init.pt was made with another discriminator


def test_changed_discriminator_in_the_same_run_folder_trains(world, tmp_path):
    # init.pt also holds the discriminator it was saved beside; a wider one (disc.hidden) must
    # not be loaded from it (a raw RuntimeError from load_state_dict), whether the folder's
    # text-only initialisation is trained again or reused.
    commands.run_train(tiny_config(runs_dir=str(tmp_path), name="run"), world, stop_after=1)
    wider = tiny_config(runs_dir=str(tmp_path), name="run", **{"disc.hidden": 48})
    commands.run_train(wider, world, stop_after=1, overwrite=True)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["config"]["disc"]["hidden"] == 48 and last["step"] == 1
    assert last["discriminator"]["roberta.embeddings.word_embeddings.weight"].shape[1] == 48


# ----------------------------------------------------------------------------------------------
# A pretrained RoBERTa takes disc.dropout


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_pretrained_discriminator_takes_the_configured_dropout(world, tmp_path, dropout):
    # Released RoBERTa ships p = 0.1 (hidden and attention); disc.dropout must reach the modules,
    # as gen.dropout reaches a pretrained GPT-2's.
    from transformers import RobertaConfig, RobertaModel

    dtok = load_tokenizer(world.roberta_path, "RoBERTa")
    RobertaModel(RobertaConfig(vocab_size=len(dtok), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64,
                               hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1),
                 add_pooling_layer=False).save_pretrained(tmp_path / "roberta")
    cfg = DiscriminatorConfig(pretrained=str(tmp_path / "roberta"), dropout=dropout)
    disc = build_discriminator(cfg, dtok)
    assert {m.p for m in disc.modules() if isinstance(m, nn.Dropout)} == {dropout}
    assert disc.roberta.config.hidden_dropout_prob == dropout
    assert disc.roberta.config.attention_probs_dropout_prob == dropout


# ----------------------------------------------------------------------------------------------
# Every config value is checked when the config is read, before any work starts


def _no_world(*args, **kwargs):
    raise AssertionError("the world was built before the config was checked")


@pytest.mark.parametrize("sets, message", [
    (["init.steps=-1"], "init.steps must be at least 1, not -1"),
    (["gan.steps=-5"], "gan.steps must be at least 1, not -5"),
    (["gan.lr=nan"], "gan.lr must be a finite number > 0, not nan"),
    (["gan.lr=-1"], "gan.lr must be a finite number > 0, not -1.0"),
    (["gan.batch=0"], "gan.batch must be at least 1, not 0"),
    (["world.corpus_style=bogus"], "world.corpus_style must be one of"),
    (["gan.baseline=loo", "gan.k=1"], "gan.baseline=loo averages the other samples of an image, "
                                      "so it needs gan.k of at least 2, not 1"),
])
def test_bad_settings_stop_train_before_any_work(sets, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CGTGAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(commands, "build_shapesworld", _no_world)
    argv = ["train", "--set", f"runs_dir={tmp_path / 'runs'}"] + [a for s in sets for a in ("--set", s)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("key, value, message", [
    ("gan.k", "0", "gan.k must be at least 1"),
    ("gan.d_groups", "0", "gan.d_groups must be at least 1"),
    ("gan.eval_every", "0", "gan.eval_every=0 validates after each epoch, so it needs gan.epochs"),
    ("gan.eval_every", "-1", "gan.eval_every must be at least 0"),
    ("disc.max_tokens", "2", "disc.max_tokens must be 0 (no cut) or at least 3"),
    ("disc.head", "mean", "disc.head must be one of cls, pooler"),
    ("init.grad_clip", "-1", "init.grad_clip must be a finite number >= 0"),
    ("gan.ckpt_every", "-1", "gan.ckpt_every must be at least 1"),
    ("init.batch", "0", "init.batch must be at least 1"),
    ("gen.max_len", "0", "gen.max_len must be at least 1"),
    ("gen.prefix_len", "0", "gen.prefix_len must be at least 1"),
    ("threads", "-1", "threads must be at least 0"),
    ("init.lr", "inf", "init.lr must be a finite number > 0"),
    ("gan.d_lr", "0", "gan.d_lr must be a finite number > 0"),
    ("gan.weight_decay", "-0.1", "gan.weight_decay must be a finite number >= 0"),
    ("gan.grad_clip", "0", "gan.grad_clip must be a finite number > 0"),
    ("gan.temperature", "-100", "gan.temperature must be a finite number > 0"),
    ("gan.lambda_final", "1.5", "gan.lambda_final must be in [0, 1]"),
    ("gan.agg_weight", "nan", "gan.agg_weight must be in [0, 1]"),
    ("gen.dropout", "1", "gen.dropout must be in [0, 1)"),
    ("disc.dropout", "-0.1", "disc.dropout must be in [0, 1)"),
    ("gan.baseline", "mean", "gan.baseline must be one of greedy, loo, not 'mean'"),
    ("decode", "sample", "decode must be one of greedy, beam"),
    ("data", "coco", "data must be one of shapesworld, real"),
    ("real.missing_images", "ignore", "real.missing_images must be one of stop, skip"),
    ("device", "gpu", "device must be auto, cpu, cuda or cuda:N, not 'gpu'"),
    ("device", "cuda:x", "device must be auto, cpu, cuda or cuda:N"),
    ("disc.hidden", "33", "disc.hidden (33) must be a multiple of disc.n_head (2)"),
])
def test_check_config_refuses_each_bad_value(key, value, message):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.apply_overrides(config.Config(), {key: value})


def test_check_config_accepts_defaults_presets_and_edges():
    for preset in config.PRESETS.values():
        config.apply_overrides(config.Config(), preset)
    edges = {"device": "cuda:1", "threads": "0", "gan.lambda_final": "1", "gan.agg_weight": "0",
             "gan.baseline": "loo", "gan.k": "2", "decode": "beam", "gen.dropout": "0.5"}
    assert config.apply_overrides(config.Config(), edges).gan.baseline == "loo"


# ----------------------------------------------------------------------------------------------
# Decoding does not depend on one transformers version's defaults


class CleaningTokenizer:
    """transformers 4.x's default: decode() cleans up the spaces before punctuation unless told
    not to (5.x no longer does for byte-level BPE)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, ids, clean_up_tokenization_spaces: bool = True, **kwargs) -> str:
        text = self.tokenizer.decode(ids, clean_up_tokenization_spaces=False, **kwargs)
        if clean_up_tokenization_spaces:
            text = text.replace(" .", ".").replace(" ,", ",").replace(" 's", "'s")
        return text


def test_decoded_captions_keep_the_corpus_spacing(world):
    gtok = load_tokenizer(world.gpt2_path, "GPT-2")
    end_id = gtok.encode(".", add_special_tokens=False)[0]
    texts = ["a red circle , a blue star . a square", "a green star 's square"]
    rows = [gtok.encode(t, add_special_tokens=False) + [end_id] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [end_id] * (width - len(r)) for r in rows])  # (N, T)
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in rows])  # (N, T)
    assert decode_captions(gtok, ids, mask, end_id) == texts
    assert decode_captions(CleaningTokenizer(gtok), ids, mask, end_id) == texts


def older_gpt2():
    """tiny_gpt2's model and weights behind a forward without `logits_to_keep`, as in
    older transformers (which took `past_key_values`, renamed `cache` in 5.x)."""
    from transformers import GPT2LMHeadModel

    params = inspect.signature(GPT2LMHeadModel.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"

    class OlderGPT2(GPT2LMHeadModel):
        def forward(self, input_ids=None, past_key_values=None, inputs_embeds=None, use_cache=None):
            return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                   use_cache=use_cache, **{cache_kw: past_key_values})

    gpt = tiny_gpt2()
    older = OlderGPT2(gpt.config).eval()
    older.load_state_dict(gpt.state_dict())
    return older


def test_hf_cache_works_without_logits_to_keep():
    gpt = tiny_gpt2()
    older = older_gpt2()
    embeds = torch.randn(2, 3, 32)  # (N, P, E)
    cache = decoding.HFCache(older)
    with torch.no_grad():
        logits = cache.start(embeds)  # (N, V)
        torch.testing.assert_close(logits, gpt(inputs_embeds=embeds).logits[:, -1])
        token = logits.argmax(-1)  # (N,)
        embeds = torch.cat([embeds, gpt.transformer.wte(token)[:, None]], 1)  # (N, P+1, E)
        torch.testing.assert_close(cache.step(token), gpt(inputs_embeds=embeds).logits[:, -1])


# ----------------------------------------------------------------------------------------------
# `caption` with bad files, and a run folder with a broken config.json


def bad_image_files(world, root) -> dict[str, object]:
    """One file of each kind `caption` can be given that is not an image."""
    png = io.BytesIO()
    world.image("img1").resize((64, 64)).effect_spread(8).save(png, "PNG")
    files = {"text": root / "notes.png", "truncated": root / "cut.png", "empty": root / "empty.png",
             "directory": root / "folder.png", "missing": root / "missing.png"}
    files["text"].write_text("not an image\n")
    files["truncated"].write_bytes(png.getvalue()[:len(png.getvalue()) // 2])
    files["empty"].touch()
    files["directory"].mkdir()
    return files


def test_caption_names_each_bad_file_and_captions_the_good_ones(world, short_run, tmp_path,
                                                                monkeypatch, capsys):
    monkeypatch.setattr(commands, "load_data", lambda cfg: world)
    good = tmp_path / "good.png"
    world.image("img0").save(good)
    bad = bad_image_files(world, tmp_path)
    argv = ["caption", str(bad["text"]), str(good), *map(str, list(bad.values())[1:])]
    assert cli.main(argv + ["--run", str(short_run)]) == 2
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and out.startswith(f"{good}: ")
    errors = dict(zip(bad, err.splitlines()))
    assert len(err.splitlines()) == len(bad)
    for kind, path in bad.items():
        assert errors[kind].startswith("error: ") and str(path) in errors[kind], errors[kind]
    assert "is a directory" in errors["directory"] and "not found" not in errors["directory"]
    assert "not found" in errors["missing"] and "empty" in errors["empty"]
    assert "truncated" in errors["truncated"]
    # Only bad files: each named, and no model is loaded.
    monkeypatch.setattr(commands, "load_data", _no_world)
    assert cli.main(["caption", str(bad["empty"]), str(bad["directory"]), "--run",
                     str(short_run)]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 2


@pytest.mark.parametrize("text", ["{\"gan\": {\"lr\": ", "[1, 2]", "{\"gan\": 5}"])
def test_broken_config_json_is_one_line(short_run, tmp_path, capsys, text):
    run_dir = tmp_path / "broken"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(text)
    for argv in (["caption", "x.png", "--run", str(run_dir)], ["eval", "--run", str(run_dir)]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert "config.json" in err or "unknown config key 'gan'" in err


# ----------------------------------------------------------------------------------------------
# Ctrl-C during train, and --resume with nothing to resume


def tiny_argv(**overrides) -> list[str]:
    """`train` arguments that give tiny_config(**overrides): a --set for each changed default."""
    defaults = config.flat_dict(config.config_dict(config.Config()))
    tiny = config.flat_dict(config.config_dict(tiny_config(**overrides)))
    sets = [f"{key}={value}" for key, value in tiny.items() if value != defaults[key]]
    return ["train"] + [a for s in sets for a in ("--set", s)]


def interrupt_at(monkeypatch, module, name: str, when) -> None:
    """Replace module.name by a function that raises KeyboardInterrupt when when(*args) holds."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        if when(*args):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def main_until_ctrl_c(argv: list[str]) -> int:
    """cli.main's exit code; a KeyboardInterrupt escaping it fails the test (not the session)."""
    try:
        return cli.main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped cli.main as a KeyboardInterrupt")


def one_line(stderr: str) -> str:
    """The line printed after the progress bars (which redraw and clear their line with \\r)."""
    assert stderr.count("\n") == 1 and stderr.endswith("\n"), stderr
    line = stderr.split("\r")[-1]
    assert line.startswith("interrupted"), stderr
    return line


def test_ctrl_c_during_train_says_what_was_saved_and_how_to_resume(world, tmp_path, monkeypatch,
                                                                   capsys):
    monkeypatch.setattr(commands, "load_data", lambda cfg: world)
    argv = tiny_argv(runs_dir=str(tmp_path), name="ctrlc")
    real_step = train.gan_step
    interrupt_at(monkeypatch, train, "gan_step", lambda run, g, d, batch, step: step == 2)
    assert main_until_ctrl_c(argv) == 130
    err = one_line(capsys.readouterr().err)
    last = tmp_path / "ctrlc" / "last.pt"
    assert f"CgT-GAN step 2 of 4 is saved in {last}; resume with: python cgtgan.py train " in err
    command = shlex.split(err.split("resume with: ")[1])
    assert command[:2] == ["python", "cgtgan.py"] and command[-1] == "--resume"
    # The printed command continues the run to its end.
    monkeypatch.setattr(train, "gan_step", real_step)
    assert cli.main(command[2:]) == 0
    assert torch.load(last, weights_only=True)["step"] == 4
    records = [json.loads(x) for x in (tmp_path / "ctrlc" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == "gan" and "loss_g" in r] == [1, 2, 3, 4]


def test_ctrl_c_before_any_checkpoint_says_start_again(world, short_run, tmp_path, monkeypatch,
                                                       capsys):
    # An earlier run's last.pt in the folder: a fresh start with --overwrite removes it, so that a
    # later --resume cannot continue that run instead of this one, and Ctrl-C says nothing is saved.
    monkeypatch.setattr(commands, "load_data", lambda cfg: world)
    (tmp_path / "fresh").mkdir()
    shutil.copyfile(short_run / "last.pt", tmp_path / "fresh" / "last.pt")
    interrupt_at(monkeypatch, train, "train_init", lambda *args: True)
    argv = tiny_argv(runs_dir=str(tmp_path), name="fresh") + ["--overwrite"]
    assert main_until_ctrl_c(argv) == 130
    err = one_line(capsys.readouterr().err)
    assert err == (f"interrupted before anything was saved in {tmp_path / 'fresh'}; start again "
                   f"with: {shlex.join(['python', 'cgtgan.py', *argv])}\n")
    assert not (tmp_path / "fresh" / "last.pt").exists()


def test_resume_with_nothing_to_resume_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CGTGAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(commands, "build_shapesworld", _no_world)
    for command in ("train", "init"):
        argv = [command, "--resume", "--set", f"runs_dir={tmp_path / 'runs'}", "--name", "new"]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: nothing to resume in {tmp_path / 'runs' / 'new'} (no ")
        assert err.count("\n") == 1
    assert not (tmp_path / "cache").exists()
