"""Tests for realdata.py on the paper-scale fixture: prepare, resume, cache keys, bad input."""
import json
import shutil

import numpy as np
import pytest
import torch

import clip_model
import clip_tokenizer
import data
import evaluate
import realdata
from config import ConfigError, RealDataConfig
from data import DataError
from fixtures import build_paperscale_fixture, save_random_clip



@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_paperscale_fixture(tmp_path_factory.mktemp("paperscale"))


@pytest.fixture(scope="module")
def prepared(fx, tmp_path_factory):
    """The fixture prepared once, uninterrupted: (config, prepare's summary, CaptionData)."""
    cfg = fx.config(cache_dir=str(tmp_path_factory.mktemp("cache")))
    summary = realdata.prepare(cfg)
    return cfg, summary, realdata.load_real_data(cfg)


def _cache_arrays(folder):
    return {p.relative_to(folder).as_posix(): data.load_arrays(p, data.cache_info(p))
            for p in sorted(folder.rglob("*.safetensors"))}


# ----------------------------------------------------------------------------------------------
# The fixture itself


def test_fixture_models_load_with_their_tokenizers(fx):
    from transformers import AutoTokenizer, GPT2LMHeadModel, RobertaModel

    for folder, model_class in ((fx.gpt2, GPT2LMHeadModel), (fx.roberta, RobertaModel)):
        tok = AutoTokenizer.from_pretrained(folder)
        assert len(tok) > 0 and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
        ids = tok("a red circle on a white background")["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == "a red circle on a white background"
        model = model_class.from_pretrained(folder)
        assert model.config.vocab_size == len(tok)
    state = clip_model.read_state_dict(fx.clip)
    assert "visual.conv1.weight" in state and "text_projection" in state and "logit_scale" in state
    assert not any(k.endswith("_heads") for k in state)


# ----------------------------------------------------------------------------------------------
# prepare and load_real_data


def test_prepare_builds_the_dataset(fx, prepared):
    cfg, summary, ds = prepared
    assert (summary["train"], summary["val"], summary["test"]) == (8, 2, 2)  # restval is train
    assert ds.name == "coco" and ds.check({}, "test") is None
    assert ds.train_ids == [str(1000 + k) for k in range(8)]
    images = realdata.read_karpathy(fx.split_file, fx.image_root)
    corpus = realdata.clean_sentences([s for im in images[:8] for s in im.sentences], cfg)
    assert ds.corpus == corpus and len(corpus) == len(set(corpus)) == 28  # 40 captions, 12 repeats
    assert ds.corpus[0] == "a yellow square on a white background"
    assert all(not s.endswith(".") and "  " not in s for s in ds.corpus)
    assert ds.train_feats.shape == (8, 32) and ds.corpus_feats.shape == (28, 32)
    assert ds.train_agg_targets.shape == (8, 32) and ds.agg_temperature == 100.0
    assert ds.image("1009").size == (48, 48)


def test_features_match_a_direct_clip_pass(fx, prepared):
    _, _, ds = prepared
    model, preprocess = clip_model.load(fx.clip)
    tokenizer = clip_tokenizer.Tokenizer(fx.clip_bpe)
    with torch.no_grad():
        image = model.encode_image(preprocess(ds.image(ds.splits["test"].ids[1])))  # (1, D)
        text = model.encode_text(clip_tokenizer.tokenize(ds.corpus[:3], 24, True, tokenizer))  # (3, D)
    image, text = image / image.norm(dim=1, keepdim=True), text / text.norm(dim=1, keepdim=True)
    torch.testing.assert_close(ds.splits["test"].feats[1:2], image, atol=2e-3, rtol=0)
    torch.testing.assert_close(ds.corpus_feats[:3], text, atol=2e-3, rtol=0)


def test_agg_targets_equal_the_equation_over_the_cached_features(prepared):
    _, _, ds = prepared
    x, s = ds.train_feats.double(), ds.corpus_feats.double()  # (N, D), (M, D)
    expected = torch.softmax(100.0 * x @ s.T, dim=1) @ s
    torch.testing.assert_close(ds.train_agg_targets.double(), expected, atol=2e-3, rtol=0)


def test_reference_files_are_coco_format_for_evaluate(prepared):
    cfg, summary, ds = prepared
    for split in ("val", "test"):
        coco = json.loads(open(summary["references"][split]).read())
        assert coco["type"] == "captions" and len(coco["annotations"]) == 10
        assert all(isinstance(a["image_id"], int) for a in coco["annotations"])
        assert len({a["id"] for a in coco["annotations"]}) == 10
        assert evaluate.load_references(summary["references"][split]) == ds.splits[split].references


def test_temperature_table():
    assert RealDataConfig(setting="coco/gcc").temperature() == 175.0
    assert RealDataConfig(setting="flickr30k/flickr30k").temperature() == 125.0
    assert RealDataConfig(setting="coco/gcc", agg_temperature=90).temperature() == 90.0
    with pytest.raises(ConfigError, match="unknown setting"):
        RealDataConfig(setting="coco/laion").temperature()


# ----------------------------------------------------------------------------------------------
# Resuming, cache keys, corrupt caches


def test_interrupted_prepare_resumes_and_equals_an_uninterrupted_run(fx, prepared, tmp_path,
                                                                     monkeypatch):
    cfg_done, _, _ = prepared
    cfg = fx.config(cache_dir=str(tmp_path))
    real_save, saved = data.save_arrays, []

    class Interrupted(Exception):
        pass

    def save_then_interrupt(path, arrays, key):
        if len(saved) == 3:
            raise Interrupted
        saved.append(path)
        real_save(path, arrays, key)

    monkeypatch.setattr(data, "save_arrays", save_then_interrupt)
    with pytest.raises(Interrupted):
        realdata.prepare(cfg)
    saved.clear()
    monkeypatch.setattr(data, "save_arrays", lambda *a: saved.append(a[0]) or real_save(*a))
    realdata.prepare(cfg)
    done = _cache_arrays(tmp_path / "coco")
    assert len(saved) == len(done) - 3  # the three finished shards were kept, not recomputed
    reference = _cache_arrays(tmp_path.parent / cfg_done.cache_dir / "coco")
    assert done.keys() == reference.keys()
    for name in done:
        for array in done[name]:
            np.testing.assert_array_equal(done[name][array], reference[name][array])
    assert not list(tmp_path.rglob("*.tmp"))


def test_cache_from_another_clip_model_is_rebuilt(fx, prepared, tmp_path, capsys):
    cfg_a, _, ds_a = prepared
    other = tmp_path / "other_clip.pt"
    save_random_clip(other, fx.clip_bpe, seed=1)
    cache = tmp_path / "cache"
    shutil.copytree(cfg_a.cache_dir, cache)
    cfg_b = fx.config(cache_dir=str(cache), clip=str(other))
    with pytest.raises(DataError, match="run prepare again"):
        realdata.load_real_data(cfg_b)
    capsys.readouterr()
    realdata.prepare(cfg_b)
    assert "made with a different CLIP model" in capsys.readouterr().err
    ds_b = realdata.load_real_data(cfg_b)
    fresh = fx.config(cache_dir=str(tmp_path / "fresh"), clip=str(other))
    realdata.prepare(fresh)
    torch.testing.assert_close(ds_b.train_feats, realdata.load_real_data(fresh).train_feats)
    assert not torch.allclose(ds_b.train_feats, ds_a.train_feats, atol=1e-2)


def test_truncated_shard_is_detected_and_rebuilt(fx, prepared, tmp_path, capsys):
    cfg, _, ds = prepared
    shutil.copytree(cfg.cache_dir, tmp_path / "cache")
    shard = tmp_path / "cache" / "coco" / "images" / "train-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-50])
    moved = fx.config(cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="train-00001.*run prepare again"):
        realdata.load_real_data(moved)
    realdata.prepare(moved)
    assert "truncated or corrupt" in capsys.readouterr().err
    torch.testing.assert_close(realdata.load_real_data(moved).train_feats, ds.train_feats)


# ----------------------------------------------------------------------------------------------
# Bad input: one-line errors naming the file and the fix


def _one_line(err):
    text = str(err.value)
    assert "\n" not in text
    return text


def _split_with(fx, tmp_path, edit):
    split = json.loads(fx.split_file.read_text())
    edit(split["images"])
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(split))
    return str(path)


def test_missing_images_stop_or_skip(fx, tmp_path, capsys):
    def add_missing(images):
        for k in range(4):
            images.append(dict(images[0], filename=f"gone_{k}.jpg", cocoid=5000 + k, imgid=500 + k))

    split_file = _split_with(fx, tmp_path, add_missing)
    with pytest.raises(DataError) as err:
        realdata.prepare(fx.config(split_file=split_file, cache_dir=str(tmp_path / "c")))
    text = _one_line(err)
    assert "4 of 16 images" in text and "gone_0.jpg" in text and "missing_images='skip'" in text
    cfg = fx.config(split_file=split_file, cache_dir=str(tmp_path / "c"), missing_images="skip")
    assert realdata.prepare(cfg)["train"] == 8
    assert "4 of 16 images" in capsys.readouterr().err


def test_unreadable_image_stop_or_skip(fx, tmp_path, capsys):
    root = tmp_path / "coco"
    shutil.copytree(fx.image_root, root)
    broken = root / "train2014" / "COCO_train2014_000000000002.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError) as err:
        realdata.prepare(fx.config(image_root=str(root), cache_dir=str(tmp_path / "c")))
    assert str(broken) in _one_line(err) and "missing_images='skip'" in str(err.value)
    cfg = fx.config(image_root=str(root), cache_dir=str(tmp_path / "c"), missing_images="skip")
    assert realdata.prepare(cfg)["train"] == 7
    ds = realdata.load_real_data(cfg)
    assert "1001" not in ds.train_ids and len(ds.train_ids) == 7 == ds.train_agg_targets.shape[0]
    assert "1 unreadable image(s) skipped" in capsys.readouterr().err


def test_empty_corpus_after_cleaning_names_the_file(fx, tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("ok\n\nyes.\n")
    with pytest.raises(DataError) as err:
        realdata.prepare(fx.config(corpus=str(corpus), cache_dir=str(tmp_path / "c")))
    assert str(corpus) in _one_line(err) and "empty after cleaning" in str(err.value)


def test_external_corpus_is_cleaned_and_used(fx, tmp_path):
    cfg = fx.config(corpus=str(fx.corpus_file), cache_dir=str(tmp_path))
    realdata.prepare(cfg)
    ds = realdata.load_real_data(cfg)
    assert len(ds.corpus) == len(set(ds.corpus)) == 24  # blank, short and duplicate lines dropped
    assert all(s == s.lower() for s in ds.corpus)
    assert (tmp_path / "coco" / "corpus-corpus").is_dir()


@pytest.mark.parametrize("case, message", [
    ("no split file", "does not exist"),
    ("bad json", "not valid JSON"),
    ("not karpathy", "no 'images' list"),
    ("bad split", "lacks filename, split"),
    ("no corpus file", "corpus file"),
    ("gpt2 without tokenizer", "has no tokenizer files"),
    ("not prepared", "run prepare again"),
    ("bad policy", "missing_images must be"),
])
def test_bad_input_gives_one_line_errors(fx, tmp_path, case, message):
    cfg = fx.config(cache_dir=str(tmp_path / "cache"))
    if case == "no split file":
        cfg.split_file = str(tmp_path / "dataset_nope.json")
    elif case == "bad json":
        (tmp_path / "bad.json").write_text('{"images": [')
        cfg.split_file = str(tmp_path / "bad.json")
    elif case == "not karpathy":
        (tmp_path / "other.json").write_text('{"annotations": []}')
        cfg.split_file = str(tmp_path / "other.json")
    elif case == "bad split":
        cfg.split_file = _split_with(fx, tmp_path, lambda ims: ims[3].update(split="dev"))
    elif case == "no corpus file":
        cfg.corpus = str(tmp_path / "nope.txt")
    elif case == "gpt2 without tokenizer":
        (tmp_path / "gpt2").mkdir()
        (tmp_path / "gpt2" / "config.json").write_text("{}")
        cfg.gpt2 = str(tmp_path / "gpt2")
    elif case == "bad policy":
        cfg.missing_images = "ignore"
    with pytest.raises(DataError) as err:
        realdata.load_real_data(cfg)
    assert message in _one_line(err)
    if case in ("no split file", "bad json", "no corpus file", "gpt2 without tokenizer"):
        assert str(tmp_path) in str(err.value)


@pytest.mark.slow
def test_decoding_workers_give_the_same_features(fx, prepared, tmp_path):
    cfg, _, ds = prepared
    parallel = fx.config(cache_dir=str(tmp_path), workers=2)
    realdata.prepare(parallel)
    torch.testing.assert_close(realdata.load_real_data(parallel).train_feats, ds.train_feats,
                               atol=0, rtol=0)
