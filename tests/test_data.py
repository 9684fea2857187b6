"""Tests for data.py: the CaptionData interface, the caches and the CLIP-agg targets."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from cgtgan import clip_agg_target
from data import CaptionData, DataError, EvalSplit


# ----------------------------------------------------------------------------------------------
# CaptionData


def _unit(n, d, seed=0):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def _tiny_data(**over):
    d = 8
    fields = dict(
        name="tiny", clip_path=Path("clip.pt"), clip_bpe_path=None,
        gpt2_path=Path("gpt2"), roberta_path=Path("roberta"),
        train_ids=["a", "b", "c"], train_feats=_unit(3, d, 1),
        corpus=["a red circle", "a blue square"], corpus_feats=_unit(2, d, 2),
        splits={"val": EvalSplit(["v"], _unit(1, d, 3), {"v": ["a red circle"]}),
                "test": EvalSplit(["t1", "t2"], _unit(2, d, 4), {"t1": ["x"], "t2": ["y", "z"]})},
        image_loader=lambda i: Image.new("RGB", (4, 4)),
    )
    fields.update(over)
    return CaptionData(**fields)


def test_valid_data_passes_and_accessors_work():
    ds = _tiny_data().validate()
    assert ds.image("a").size == (4, 4)
    assert ds.check({"t1": "x"}, "test") is None
    checked = _tiny_data(checker=lambda caps, split: {"fluency": 1.0, "faithfulness": len(caps)})
    assert checked.check({"t1": "x"}, "test") == {"fluency": 1.0, "faithfulness": 1}


@pytest.mark.parametrize("over, message", [
    (dict(corpus_feats=_unit(2, 6)), "mismatched embedding widths"),
    (dict(corpus=[], corpus_feats=_unit(0, 8)), "corpus is empty"),
    (dict(train_ids=["a", "b"]), "train_ids has 2 entries but train_feats has 3 rows"),
    (dict(train_feats=_unit(3, 8) * 2), "not L2-normalised"),
    (dict(train_feats=_unit(3, 8).double()), "must be float32"),
    (dict(splits={"val": EvalSplit(["v"], _unit(1, 8), {"v": ["x"]})}), "lack ['test']"),
    (dict(splits={"val": EvalSplit(["v"], _unit(1, 8), {"v": []}),
                  "test": EvalSplit(["t"], _unit(1, 8), {"t": ["x"]})}), "no reference captions"),
    (dict(train_agg_targets=_unit(2, 8)), "train_agg_targets has 2 rows"),
])
def test_validate_gives_one_line_errors(over, message):
    with pytest.raises(DataError) as err:
        _tiny_data(**over).validate()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_image_without_loader_is_a_clear_error():
    with pytest.raises(DataError, match="no images"):
        _tiny_data(image_loader=None).image("a")


# ----------------------------------------------------------------------------------------------
# Caches


def test_nearest_finds_the_best_row_across_chunks():
    keys = _unit(10, 8, 5)
    queries = torch.nn.functional.normalize(keys[[7, 2, 9]] + 0.05 * _unit(3, 8, 6), dim=1)
    best, arg = data.nearest(queries, keys, chunk=3)
    assert arg.tolist() == [7, 2, 9]
    assert torch.allclose(best, (queries @ keys.T).max(1).values)


def _cloud(n, seed, spread=(0.3, 0.3, 0.3, 0.01, 0.01, 0.01, 0.01, 0.01)):
    """Unit vectors around the first axis, spread along axes 1-3 and hardly at all along 4-7."""
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed)) * torch.tensor((0.0,) + spread[1:])
    x[:, 0] = 1.0
    return torch.nn.functional.normalize(x, dim=1)


def test_familiarity_flags_images_far_from_or_off_the_spread_of_the_training_images():
    train, test = _cloud(400, 1), _cloud(300, 2)
    ids = [f"t{i}" for i in range(300)]
    d = _tiny_data(train_ids=[f"x{i}" for i in range(400)], train_feats=train,
                   splits={"val": EvalSplit(ids[:1], test[:1], {"t0": ["x"]}),
                           "test": EvalSplit(ids, test, {i: ["x"] for i in ids})}).validate()
    familiar = data.Familiarity(d)
    assert sum(why is not None for why in familiar.unlike(test)) <= 0.02 * len(ids) + 1
    assert familiar.unlike(train[:20]).count(None) >= 19
    opposite = -train[:1]  # a photo: far from every training image
    off_spread = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0, 0, 0.1, 0, 0, 0]]), dim=1)
    assert (off_spread @ train.T).max() > familiar.min_cos  # close in cosine...
    far, off = familiar.unlike(torch.cat([opposite, off_spread]))
    assert far.startswith("nearest training image at cosine -")
    assert off.startswith("Mahalanobis distance")  # ...but along a direction they never vary in


def test_cache_key_is_stable_and_sensitive():
    a = data.cache_key(model="ViT-B/32", t=100.0, path=Path("x/y"), arr=np.arange(3))
    assert a == data.cache_key(arr=np.arange(3), path="x/y", t=100.0, model="ViT-B/32")
    assert a != data.cache_key(model="ViT-B/32", t=100.0, path=Path("x/y"), arr=np.arange(4))
    assert a != data.cache_key(model="ViT-L/14", t=100.0, path=Path("x/y"), arr=np.arange(3))
    assert len(a) == 16


def test_save_load_roundtrip_and_key_mismatch(tmp_path):
    arrays = {"feats": np.random.default_rng(0).standard_normal((5, 3)).astype(np.float16),
              "idx": np.arange(5, dtype=np.int64)}
    path = tmp_path / "sub" / "cache.safetensors"
    data.save_arrays(path, arrays, key="k1")
    back = data.load_arrays(path, "k1")
    assert set(back) == {"feats", "idx"}
    assert back["feats"].dtype == np.float16 and np.array_equal(back["feats"], arrays["feats"])
    assert data.load_arrays(path, "k2") is None
    assert data.load_arrays(tmp_path / "missing.safetensors", "k1") is None
    assert data.cache_info(path) == "k1"
    assert [p.name for p in path.parent.iterdir()] == ["cache.safetensors"]  # no temp files left


def test_truncated_or_corrupt_cache_is_not_trusted(tmp_path):
    path = tmp_path / "cache.safetensors"
    data.save_arrays(path, {"x": np.ones((64, 8), np.float32)}, key="k")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    assert data.load_arrays(path, "k") is None
    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF
    path.write_bytes(bytes(flipped))
    assert data.load_arrays(path, "k") is None
    path.write_bytes(b"not a safetensors file")
    assert data.load_arrays(path, "k") is None


def test_interrupted_save_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "cache.safetensors"
    data.save_arrays(path, {"x": np.zeros(3, np.float32), "empty": np.zeros((0, 4), np.float16)},
                     key="old")

    def boom(tmp):
        Path(tmp).write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        data.atomic_write(path, boom)
    assert data.load_arrays(path, "old") is not None
    assert [p.name for p in tmp_path.iterdir()] == ["cache.safetensors"]



def test_json_round_trip_and_unreadable_files_are_one_line_errors(tmp_path):
    path = tmp_path / "sub" / "record.json"
    data.write_json(path, {"key": "k", "values": [1, 2.5, "crimson"]}, indent=2)
    assert data.read_json(path) == {"key": "k", "values": [1, 2.5, "crimson"]}
    assert path.read_text(encoding="utf-8").startswith("{\n  ")
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]  # no temporary file left
    path.write_text('{"key": "k", "valu')  # a file cut short
    with pytest.raises(DataError, match="record.json is not valid JSON"):
        data.read_json(path)
    with pytest.raises(DataError, match="cannot read .*missing.json"):
        data.read_json(tmp_path / "missing.json")

# ----------------------------------------------------------------------------------------------
# CLIP-agg targets


def _agg_float64(images, corpus, t):
    """The equation, directly: per image, softmax over the whole corpus in float64."""
    x = images.astype(np.float64)
    s = corpus.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    logits = t * x @ s.T  # (N, M)
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (w / w.sum(axis=1, keepdims=True)) @ s  # (N, D)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("image_chunk, corpus_chunk", [(3, 2), (5, 7), (37, 101), (64, 1000)])
def test_clip_agg_target_chunks_equal_direct_float64(dtype, image_chunk, corpus_chunk):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((37, 16)).astype(dtype)
    corpus = rng.standard_normal((101, 16)).astype(dtype)
    out = clip_agg_target(images, corpus, 100.0, image_chunk, corpus_chunk)
    assert out.shape == (37, 16) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), _agg_float64(images, corpus, 100.0), atol=1e-5)


def test_clip_agg_target_chunks_stable_at_high_temperature_and_accept_tensors():
    # t = 1e4 puts logits near 1e4: a naive exp overflows float32, the online softmax does not.
    rng = np.random.default_rng(1)
    images, corpus = rng.standard_normal((6, 8)), rng.standard_normal((50, 8))
    out = clip_agg_target(torch.from_numpy(images), torch.from_numpy(corpus), 1e4, 4, 8)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), _agg_float64(images, corpus, 1e4), atol=1e-4)


def test_clip_agg_target_chunks_worked_example_and_bad_input():
    corpus = np.eye(2, dtype=np.float32)
    out = clip_agg_target(np.array([[1.0, 0.0], [1.0, 1.0]], np.float32), corpus, 100.0)
    np.testing.assert_allclose(out.numpy(), [[1.0, 0.0], [0.5, 0.5]], atol=1e-6)
    with pytest.raises(ValueError, match="3 wide"):
        clip_agg_target(np.ones((2, 3)), np.ones((2, 4)), 100.0)
    with pytest.raises(ValueError, match="non-empty"):
        clip_agg_target(np.ones((2, 3)), np.ones((0, 3)), 100.0)
