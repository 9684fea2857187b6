"""ShapesWorld: determinism, ground truth, disjoint splits, tokenizers, tiny CLIP, caches."""
import json
import os
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip_model
import clip_tokenizer
import data
import shapes_clip
import shapes_grammar as grammar
import shapes_scenes
import shapesworld as sw
from config import ConfigError


def tiny(root, **overrides) -> sw.ShapesWorldConfig:
    """A world that builds in a few seconds: tiny splits, a one-layer CLIP trained for 3 steps."""
    settings = dict(n_clip_pairs=300, n_clip_heldout=60, n_clip_closeups=60, n_train=40,
                    n_corpus=150, n_val=8, n_test=12, clip_steps=3, clip_batch_size=32,
                    clip_vision_layers=1,
                    clip_text_layers=1, clip_embed_dim=32, root=str(root))
    settings.update(overrides)
    return sw.ShapesWorldConfig(**settings)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = tiny(tmp_path_factory.mktemp("world"))
    return cfg, sw.build_shapesworld(cfg, progress=False)


# ----------------------------------------------------------------------------------------------
# The grammar and the checker


def test_every_generated_caption_parses_and_is_true_in_both_styles():
    rng = random.Random(0)
    for _ in range(400):
        scene = grammar.sample_scene(rng)
        for style in grammar.STYLES:
            for caption in grammar.references(scene, style, rng):
                facts = grammar.parse(caption)
                assert facts, (style, caption)
                assert all(grammar.fact_holds(f, scene) for f in facts), (caption, scene)
                assert caption == " ".join(caption.split()) and caption == caption.lower()
                assert not caption.endswith(".")


def test_checker_counts_false_facts_and_rejects_ungrammatical_captions():
    red_circle = grammar.Obj("circle", "red", "small", 2, 0)
    blue_square = grammar.Obj("square", "blue", "large", 0, 0)
    scenes = {"a": (red_circle, blue_square)}

    def score(caption):
        return grammar.check({"a": caption}, scenes)

    assert score("a blue square above a red circle") == {"fluency": 1.0, "faithfulness": 1.0}
    assert score("a red circle above a blue square")["faithfulness"] == pytest.approx(2 / 3)
    assert score("two red circles")["faithfulness"] == 0.0  # there is exactly one
    assert score("a large red circle")["faithfulness"] == 0.0
    assert score("a small red circle in the bottom left corner")["faithfulness"] == 1.0
    assert score("a red circle at the top")["faithfulness"] == 0.5
    assert score("two shapes including a crimson ball and a blue tile")["faithfulness"] == 1.0
    for bad in ("circle circle", "an red circle", "a orange star", "two red circle",
                "a red circles", "a red circle above", ""):
        assert score(bad)["fluency"] == 0.0, bad
    assert grammar.parse("a red circle above two blue squares.") == [
        ("np", ("some", "circle", "red", None)), ("np", (2, "square", "blue", None)),
        ("rel", ("some", "circle", "red", None), "above", (2, "square", "blue", None))]


def test_fact_split_counts_true_and_claimed_facts_by_kind():
    scenes = {"a": (grammar.Obj("circle", "red", "small", 2, 0),
                    grammar.Obj("square", "blue", "large", 0, 0))}
    assert grammar.fact_split({"a": "a large red circle above a blue square"}, scenes) == {
        "object": (1, 1), "object+size": (0, 1), "relation": (0, 1)}
    assert grammar.fact_split({"a": "two red circles in the bottom left corner"}, scenes) == {
        "object+count": (0, 1), "position": (1, 1)}  # the one red circle is there
    assert grammar.fact_split({"a": "circle circle"}, scenes) == {}  # unparsed: no claims


def test_size_claims_sort_each_size_word_by_what_the_scene_holds():
    scenes = {"a": (grammar.Obj("circle", "red", "small", 2, 0),
                    grammar.Obj("square", "blue", "large", 0, 0))}
    captions = {"a": "a large red circle and a medium green star"}
    assert grammar.size_claims(captions, scenes) == {"large": {"wrong size": 1},
                                                     "medium": {"no such object": 1}}
    captions = {"a": "a small red circle and a big blue box and a blue square"}
    assert grammar.size_claims(captions, scenes) == {"large": {"right size": 1},
                                                     "small": {"right size": 1}}
    assert grammar.size_claims({"a": "circle circle"}, scenes) == {}


def test_size_variants_name_each_size_then_none_and_parse_back():
    scene = (grammar.Obj("circle", "orange", "small", 2, 0),)
    variants = grammar.size_variants(scene)
    assert variants == [["a small orange circle", "a medium orange circle", "a large orange circle",
                         "an orange circle"]]
    sizes = [grammar.parse(c)[0][1][3] for c in variants[0]]
    assert sizes == [*grammar.SIZES, None]


def test_false_words_mark_the_wrong_word_of_each_false_fact():
    scene = (grammar.Obj("circle", "red", "small", 2, 0), grammar.Obj("square", "blue", "large", 0, 0))

    def wrong(caption):
        marks = grammar.false_words(caption, scene)
        return None if marks is None else [w for w, bad in zip(grammar.normalise(caption), marks) if bad]

    assert grammar.parse_spans("a red circle above a blue square") == [
        (("np", ("some", "circle", "red", None)), (0, 3)),
        (("np", ("some", "square", "blue", None)), (4, 7)),
        (("rel", ("some", "circle", "red", None), "above", ("some", "square", "blue", None)), (3, 4))]
    assert wrong("a blue square above a red circle") == []
    assert wrong("a small red circle in the bottom left corner") == []
    assert wrong("a large red circle above a blue square") == ["large", "above"]
    assert wrong("a red circle at the top") == ["at", "the", "top"]
    assert wrong("two red circles") == ["two"]  # there is exactly one
    assert wrong("a red triangle") == ["triangle"]
    assert wrong("a pink circle") == ["pink"]
    assert wrong("a green star") == ["a", "green", "star"]  # no single word fixes it
    assert wrong("three shapes including a crimson ball") == ["three"]
    assert wrong("circle circle") is None and wrong("") is None
    assert grammar.false_words("a red circle.", scene) == [False] * 3


def test_world_references_are_distinct_and_check_fully(world):
    cfg, d = world
    for split in ("val", "test"):
        refs = d.splits[split].references
        assert all(len(set(r)) == cfg.n_references for r in refs.values())
        for k in range(cfg.n_references):
            checked = d.check({i: r[k] for i, r in refs.items()}, split)
            assert (checked["fluency"], checked["faithfulness"]) == (1.0, 1.0)
            assert checked["per_image"] == {i: [False] * len(r[k].split()) for i, r in refs.items()}


def test_checker_rejects_unknown_split_or_id(world):
    _, d = world
    with pytest.raises(ValueError, match="no split"):
        d.check({}, "nope")
    with pytest.raises(ValueError, match="no image"):
        d.check({"train_00000": "a red circle"}, "test")


def test_a_reuse_keeps_the_build_report(world):
    # report.json records what the build took; a later run that only reads the cache keeps it.
    cfg, _ = world
    path = sw.world_dir(cfg) / "report.json"
    built = json.loads(path.read_text())
    assert {"text", "images", "tokenizers", "clip", "embeddings"} <= built["timings_s"].keys()
    sw.build_shapesworld(cfg, progress=False)
    assert json.loads(path.read_text()) == built


# ----------------------------------------------------------------------------------------------
# Splits and determinism


def test_same_seed_same_world_different_seed_different(tmp_path, world):
    cfg, d = world
    again = sw.build_shapesworld(tiny(tmp_path / "again"), progress=False)
    assert again.corpus == d.corpus
    assert again.splits["test"].references == d.splits["test"].references
    assert np.array_equal(np.asarray(again.image("train_00007")), np.asarray(d.image("train_00007")))
    for sub in ("gpt2/vocab.json", "gpt2/merges.txt", "roberta/merges.txt"):
        assert (d.gpt2_path.parent / sub).read_bytes() == (again.gpt2_path.parent / sub).read_bytes()
    assert d.clip_bpe_path.read_bytes() == again.clip_bpe_path.read_bytes()
    assert torch.allclose(again.train_feats, d.train_feats, atol=1e-5)
    other = sw.make_world(tiny(tmp_path, seed=1))
    assert other["corpus"] != d.corpus
    assert other["scenes"]["train"] != sw.make_world(cfg)["scenes"]["train"]


def test_corpus_comes_from_independent_scenes(tmp_path):
    cfg = tiny(tmp_path)
    world = sw.make_world(cfg)
    # The corpus does not change when the training set does: it is not made from its captions.
    assert sw.make_world(tiny(tmp_path, n_train=cfg.n_train * 3))["corpus"] == world["corpus"]
    corpus_scenes = {tuple(map(tuple, grammar.scene_to_json(s)))
                     for s in shapes_scenes.make_scenes(cfg, "corpus", cfg.n_corpus)}
    for split in ("train", "val", "test"):
        assert not corpus_scenes & {tuple(map(tuple, s)) for s in world["scenes"][split]}


def test_most_test_references_are_not_in_the_corpus(tmp_path):
    world = sw.make_world(sw.ShapesWorldConfig(n_train=10, n_corpus=15000, n_val=5, n_test=600))
    assert sw._share_in_corpus(world) < 0.5


def test_alt_corpus_uses_another_grammar(tmp_path):
    plain = sw.make_world(tiny(tmp_path, n_corpus=400))
    alt = sw.make_world(tiny(tmp_path, n_corpus=400, corpus_style="alt"))
    assert alt["references"] == plain["references"]  # the images' own (plain) references
    plain_words = {w for s in plain["corpus"] for w in s.split()}
    alt_words = {w for s in alt["corpus"] for w in s.split()}
    assert {"picture", "crimson", "located"} & (alt_words - plain_words)
    assert all(grammar.parse(s) for s in alt["corpus"])
    with pytest.raises(ValueError, match="corpus_style"):
        sw.build_shapesworld(tiny(tmp_path, corpus_style="poetry"), progress=False)


# ----------------------------------------------------------------------------------------------
# Tokenizers


def test_tokenizers_round_trip_every_corpus_sentence(world):
    from transformers import GPT2TokenizerFast, RobertaTokenizerFast

    _, d = world
    gpt2 = GPT2TokenizerFast.from_pretrained(str(d.gpt2_path))
    roberta = RobertaTokenizerFast.from_pretrained(str(d.roberta_path))
    clip_tok = clip_tokenizer.Tokenizer(d.clip_bpe_path)
    assert len(gpt2) > 0 and len(roberta) > 0 and gpt2.eos_token == "<|endoftext|>"
    assert roberta.pad_token_id == 1 and roberta.mask_token == "<mask>"
    assert {"vocab.json", "merges.txt"} <= {p.name for p in Path(d.gpt2_path).iterdir()}
    texts = d.corpus + [r for rs in d.splits["test"].references.values() for r in rs]
    for text in texts:
        assert gpt2.decode(gpt2(text).input_ids) == text
        assert roberta.decode(roberta(text).input_ids, skip_special_tokens=True) == text
        assert clip_tok.decode(clip_tok.encode(text)).strip() == text
    assert torch.equal(shapes_clip.clip_tokens(texts, clip_tok, 32),
                       clip_tokenizer.tokenize(texts, 32, truncate=True, tokenizer=clip_tok))
    long = " ".join(["a red circle"] * 20)
    assert torch.equal(shapes_clip.clip_tokens([long], clip_tok, 32),
                       clip_tokenizer.tokenize([long], 32, truncate=True, tokenizer=clip_tok))
    # Learned merges make whole corpus words single CLIP tokens.
    assert len(clip_tok.encode("a red circle")) == 3


def test_learn_bpe_merges_most_frequent_pair_first():
    assert sw.learn_bpe(["low low lot"], max_merges=2) == [("l", "o"), ("lo", "w</w>")]


# ----------------------------------------------------------------------------------------------
# The tiny CLIP and the embedding caches


def test_cached_image_features_equal_the_preprocess_path(world):
    _, d = world
    model, preprocess = clip_model.load(d.clip_path)
    assert model.logit_scale.exp().item() == pytest.approx(100.0)
    with torch.no_grad():
        feats = F.normalize(model.encode_image(preprocess([d.image("test_00003")])), dim=-1)
    assert torch.allclose(feats[0], d.splits["test"].feats[3], atol=1e-5)


def test_tiny_clip_pretraining_fits_a_small_set_of_pairs(tmp_path):
    # Learning signal on a budget of seconds: 32 pairs seen 60 times become retrievable. (At 30
    # steps the training loss is already ~0, but the ResNet's BatchNorm running statistics, which
    # eval mode uses, still lag behind: R@1 1/16.)
    cfg = tiny(tmp_path, n_clip_pairs=32, n_clip_heldout=1, clip_steps=60, clip_batch_size=32)
    scenes, captions = shapes_clip.clip_pairs(cfg)
    plain = [c[0] for c in captions[:32]]
    images = shapes_scenes.render_all(cfg, "clip", scenes[:32], progress=False)
    clip_tokenizer.write_merges(tmp_path / "bpe.txt", sw.learn_bpe(plain))
    tokenizer = clip_tokenizer.Tokenizer(tmp_path / "bpe.txt")
    tokens = shapes_clip.clip_tokens(plain, tokenizer, 32)[:, None]  # (32, 1, L)
    model, losses = shapes_clip.pretrain_clip(cfg, images, tokens, tokenizer.vocab_size,
                                              progress=False)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    image_feats = shapes_clip.encode_images(model, images)  # (32, D)
    text_feats = shapes_clip.encode_texts(model, tokenizer, plain)  # (32, D)
    figures = shapes_clip.retrieval_and_gap(image_feats, text_feats, plain)
    assert figures["r1"] > 10 * figures["chance_r1"]
    assert model.logit_scale.exp().item() == pytest.approx(100.0)


def test_scene_shape_probe_reads_each_object_with_a_colour_of_its_own(world):
    # Scene "images" made of the probe's own text embeddings: scene k's embedding is the text of
    # its first object with `named` as the shape, so the probe finds the true shape exactly when
    # named is it. Objects sharing a colour with another one are left out.
    cfg, d = world
    model, _ = clip_model.load(d.clip_path)
    tokenizer = clip_tokenizer.Tokenizer(d.clip_bpe_path)
    O = grammar.Obj
    scenes = [(O("star", "red", "small", 0, 0),),
              (O("circle", "blue", "large", 0, 0), O("square", "pink", "small", 2, 2)),
              (O("circle", "green", "small", 0, 0), O("star", "green", "large", 1, 1))]
    named = ["star", "triangle", "circle"]  # true, wrong, true (but scene 3 shares its colour)
    feats = shapes_clip.encode_texts(model, tokenizer, [f"a {s[0].colour} {n}" for s, n in
                                                        zip(scenes, named)])  # (3, D)
    got = shapes_clip.shape_and_colour_accuracy(model, tokenizer, cfg, scenes, feats)
    # Counted objects: the red star (right), the blue circle (wrong) and the pink square, whose
    # answer depends on the random CLIP: 1/3 or 2/3, never the green pair.
    assert got["scene_shape_acc"] in (pytest.approx(1 / 3), pytest.approx(2 / 3))
    one = shapes_clip.shape_and_colour_accuracy(model, tokenizer, cfg, scenes[:1], feats[:1])
    assert one["scene_shape_acc"] == 1.0
    both = shapes_clip.shape_and_colour_accuracy(model, tokenizer, cfg, scenes[1:2], feats[1:2])
    assert both["scene_shape_acc"] in (0.0, 0.5)


def test_close_up_captions_name_the_size_when_asked_and_the_probe_never(tmp_path):
    cfg = tiny(tmp_path, clip_closeup_sizes=1.0)
    scenes, captions = shapes_clip.closeups(cfg, "clip-closeup", 20)
    assert captions == [f"a {s[0].size} {s[0].colour} {s[0].shape}" for s in scenes]
    assert shapes_clip.closeups(tiny(tmp_path), "clip-closeup", 20) == (scenes, [
        f"a {s[0].colour} {s[0].shape}" for s in scenes])  # the same close-ups, sizes unnamed
    probe, probe_captions = shapes_clip.closeups(cfg, "clip-probe", 20)
    assert probe_captions == [f"a {s[0].colour} {s[0].shape}" for s in probe]


@pytest.mark.parametrize("shift", [0, 1])
def test_size_probe_finds_the_size_each_close_up_shows(world, monkeypatch, shift):
    # Close-up "images" embedded as the text of their true size (shift 0) or the next size
    # (shift 1): the probe reads every size right, then every size wrong.
    cfg, d = world
    model, _ = clip_model.load(d.clip_path)
    tokenizer = clip_tokenizer.Tokenizer(d.clip_bpe_path)
    probe, _ = shapes_clip.closeups(cfg, "clip-probe", shapes_clip.PROBE_IMAGES)
    size = {z: grammar.SIZES[(k + shift) % 3] for k, z in enumerate(grammar.SIZES)}
    texts = [f"a {size[s[0].size]} {s[0].colour} {s[0].shape}" for s in probe]
    feats = shapes_clip.encode_texts(model, tokenizer, texts)
    monkeypatch.setattr(shapes_clip, "render_all", lambda *args: None)
    monkeypatch.setattr(shapes_clip, "encode_images", lambda model, images: feats)
    got = shapes_clip.shape_and_colour_accuracy(model, tokenizer, cfg, [], feats[:0])
    assert got["size_acc"] == (1.0 if shift == 0 else 0.0)
    # Inside scenes: one-object scenes whose "image" is the text of their object's (shifted) size.
    scenes = [(grammar.Obj(s[0].shape, s[0].colour, s[0].size, 1, 1),) for s in probe[:30]]
    got = shapes_clip.shape_and_colour_accuracy(model, tokenizer, cfg, scenes, feats[:30])
    assert got["scene_size_acc"] == (1.0 if shift == 0 else 0.0)


@pytest.fixture(scope="module")
def clip_world(tmp_path_factory):
    """The default CLIP settings on fewer pairs (a slow build), and enough training and test
    images for the caption command's percentiles."""
    cfg = sw.ShapesWorldConfig(n_clip_pairs=6000, n_clip_heldout=300, n_train=1000, n_corpus=10,
                               n_val=2, n_test=300, root=str(tmp_path_factory.mktemp("clip_world")))
    return cfg, sw.build_shapesworld(cfg, progress=False)


@pytest.mark.slow
def test_default_tiny_clip_reads_shapes_and_colours(clip_world):
    # A shape-blind CLIP (the earlier ViT, or the ResNet without close-ups) scored 14-22% on
    # shapes, chance being 17%.
    cfg, _ = clip_world
    figures = sw.load_report(cfg)["clip"]
    assert figures["r1"] > 10 * figures["chance_r1"]
    assert figures["colour_acc"] > 0.9
    assert figures["shape_acc"] > 2.5 / len(grammar.SHAPES)
    # Inside crowded scenes too: the 48-px default of version 3 read them at chance (25%, 17%).
    assert figures["scene_shape_acc"] > 2 / len(grammar.SHAPES)


@pytest.mark.slow
def test_blank_images_are_unlike_the_training_images_and_rendered_scenes_are_not(clip_world,
                                                                                tmp_path):
    # What `python cgtgan.py caption` warns about: image files, read and encoded as it does.
    _, d = clip_world
    model, preprocess = clip_model.load(str(d.clip_path))
    rng = random.Random("caption-test")
    files = [tmp_path / "blank.png", tmp_path / "dot.png"] + [tmp_path / f"scene{k}.png" for k in range(20)]
    Image.new("RGB", (96, 96), (128, 128, 128)).save(files[0])
    Image.new("RGB", (1, 1), (255, 255, 255)).save(files[1])
    for k, path in enumerate(files[2:]):
        pixels = shapes_scenes.render(grammar.sample_scene(rng), 96, np.random.default_rng(k))
        Image.fromarray(pixels).save(path)
    with torch.no_grad():
        feats = F.normalize(model.encode_image(preprocess([clip_model.load_image(f) for f in files])), dim=-1)
    unlike = data.Familiarity(d).unlike(feats)
    assert unlike[0] and unlike[1], unlike[:2]
    assert sum(why is not None for why in unlike[2:]) <= 2, unlike[2:]  # ~2% of test images are


def test_stale_or_truncated_caches_are_rebuilt(tmp_path):
    cfg = tiny(tmp_path)
    d = sw.build_shapesworld(cfg, progress=False)
    built = sw.load_report(cfg)
    assert sw.build_shapesworld(cfg, progress=False) is not None
    assert sw.load_report(cfg) == built  # everything reused: nothing timed, the record kept
    feats = tmp_path / "feats.safetensors"
    feats.write_bytes(feats.read_bytes()[:-100])
    clip_pt = tmp_path / "clip.pt"
    clip_pt.write_bytes(clip_pt.read_bytes() + b"x")
    again = sw.build_shapesworld(cfg, progress=False)
    assert set(sw.load_report(cfg)["timings_s"]) == {"clip", "embeddings"}
    assert torch.allclose(again.corpus_feats, d.corpus_feats, atol=1e-5)
    world = tmp_path / "world.json"
    world.write_text(world.read_text().replace('"key": "', '"key": "stale', 1))
    sw.build_shapesworld(cfg, progress=False)
    assert "text" in sw.load_report(cfg)["timings_s"]


def test_swap_twins_trade_shapes_keep_the_background_and_caption_the_change(tmp_path):
    # Two objects that differ in shape and colour trade shapes; the twin is drawn with its
    # original's background and noise; its partial captions name the changed object.
    red_star = grammar.Obj("star", "red", "large", 0, 0)
    blue_circle = grammar.Obj("circle", "blue", "large", 2, 2)
    twin, a = shapes_clip.swap_twin((red_star, blue_circle), random.Random(0))
    assert [o.shape for o in twin] == ["circle", "star"] and a in (0, 1)
    assert [o.colour for o in twin] == ["red", "blue"]
    lone, a = shapes_clip.swap_twin((red_star,), random.Random(0))
    assert a == 0 and lone[0].shape != "star" and lone[0].colour == "red"
    resized, a = shapes_clip.swap_twin((red_star, blue_circle), random.Random(0), resize=True)
    assert [o.size != "large" for o in resized] == [k == a for k in range(2)]
    assert [(o.shape, o.colour) for o in resized] == [("star", "red"), ("circle", "blue")]
    cfg = tiny(tmp_path, n_clip_pairs=40, clip_swaps=1.0, clip_swap_captions=0.5, clip_size_twins=0.5)
    scenes, captions = shapes_clip.clip_pairs(cfg)
    clip_tokenizer.write_merges(tmp_path / "bpe.txt", sw.learn_bpe([c for cs in captions for c in cs]))
    tokenizer = clip_tokenizer.Tokenizer(tmp_path / "bpe.txt")
    twins = shapes_clip.swap_twins(cfg, scenes, captions, tokenizer, progress=False)
    images, twin_tokens, original_tokens, rows = twins
    originals = shapes_scenes.render_all(cfg, "clip", scenes[:20], progress=False)
    assert images.shape == originals.shape and twin_tokens.shape == (20, shapes_clip.TWIN_SLOTS, 32)
    assert torch.equal(rows, torch.arange(20))
    corner = (originals[:, :4, :4].astype(int) - images[:, :4, :4]).__abs__().mean()
    assert corner < (originals[:, :4, :4].astype(int) - originals[::-1, :4, :4]).__abs__().mean() / 5
    assert not np.array_equal(images, originals)
    partial = [tokenizer.decode(row[1:int(row.argmax())].tolist()).strip() for row in twin_tokens[:, 0]]
    assert all(p.startswith("a ") for p in partial)
    assert {len(p.split()) for p in partial} == {3, 4}  # "a red circle", "a large red star"
    assert not torch.equal(twin_tokens[:, :5], original_tokens[:, :5])  # the changed object's words
    model, losses = shapes_clip.pretrain_clip(cfg, originals, original_tokens[:, 5:],
                                              tokenizer.vocab_size, False, None, twins)
    assert len(losses) == cfg.clip_steps and all(np.isfinite(losses))
    with pytest.raises(ConfigError, match="world.clip_swaps"):
        replace(cfg, clip_swaps=1.5)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_pretraining_on_two_processes_equals_one(tmp_path, monkeypatch, start_method):
    # A ViT image tower has no BatchNorm, so two processes that each embed half of every batch
    # and sum their gradients take the steps of one process, up to float rounding. The rows are
    # shared out as pairs and close-ups alike; the batch (10) does not split evenly.
    cfg = tiny(tmp_path, n_clip_pairs=40, clip_image_encoder="vit", clip_patch_size=32,
               clip_vision_width=32, clip_steps=4, clip_batch_size=10)
    scenes, captions = shapes_clip.clip_pairs(cfg)
    clip_tokenizer.write_merges(tmp_path / "bpe.txt", sw.learn_bpe([c for cs in captions for c in cs]))
    tokenizer = clip_tokenizer.Tokenizer(tmp_path / "bpe.txt")
    images, tokens, closeup, _ = shapes_clip.pretraining_inputs(cfg, (scenes[:40], captions[:40]),
                                                                tokenizer, progress=False)
    one, losses_one = shapes_clip.pretrain_clip(cfg, images, tokens, tokenizer.vocab_size, False,
                                                closeup)
    monkeypatch.setattr(torch.multiprocessing, "get_all_start_methods", lambda: [start_method])
    two, losses_two = shapes_clip.pretrain_clip(replace(cfg, clip_procs=2), images, tokens,
                                                tokenizer.vocab_size, False, closeup)
    assert len(set(losses_one)) == cfg.clip_steps  # every step moved the model
    torch.testing.assert_close(torch.tensor(losses_two), torch.tensor(losses_one), rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=name)
    assert sw.world_key(replace(cfg, clip_procs=2)) != sw.world_key(cfg)
    if start_method == "fork":  # the ResNet's BatchNorm statistics: each process's, averaged
        resnet = replace(tiny(tmp_path, n_clip_pairs=40, clip_steps=2, clip_batch_size=10),
                         clip_procs=2)
        model, losses = shapes_clip.pretrain_clip(resnet, images, tokens, tokenizer.vocab_size, False,
                                                  closeup)
        assert all(np.isfinite(losses)) and model.visual.bn1.running_mean.abs().sum() > 0


def test_rendering_processes_draw_the_same_pixels_and_never_key_the_cache(tmp_path):
    # Three chunks over two processes, finished in any order, give one process's pixels.
    cfg = tiny(tmp_path)
    scenes = shapes_scenes.make_scenes(cfg, "clip", 2 * shapes_scenes.RENDER_CHUNK + 7)
    one = shapes_scenes.render_all(replace(cfg, render_procs=1), "clip", scenes, progress=False)
    two = shapes_scenes.render_all(replace(cfg, render_procs=2), "clip", scenes, progress=False)
    assert np.array_equal(one, two) and one[-1].any()
    assert sw.world_key(replace(cfg, render_procs=3)) == sw.world_key(cfg)
    with pytest.raises(ConfigError, match="world.render_procs"):
        replace(cfg, render_procs=-1)


def test_threads_are_set_for_the_build_only_and_never_key_the_cache(world, monkeypatch):
    cfg, d = world
    assert sw.world_key(replace(cfg, threads=2, root=None)) == sw.world_key(cfg)
    assert sw.world_dir(replace(cfg, threads=2, root=None)) == sw.world_dir(replace(cfg, root=None))
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    before = torch.get_num_threads()
    with sw.cpu_threads(1):
        assert torch.get_num_threads() == 1
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    assert torch.get_num_threads() == before and "TOKENIZERS_PARALLELISM" not in os.environ
    with pytest.raises(KeyboardInterrupt), sw.cpu_threads(3):
        assert torch.get_num_threads() == 3
        raise KeyboardInterrupt
    assert torch.get_num_threads() == before
    # Another thread count finds every part of the same world and reuses it.
    built = sw.load_report(cfg)
    again = sw.build_shapesworld(replace(cfg, threads=3), progress=False)
    assert sw.load_report(cfg) == built  # nothing rebuilt, so the build's record is kept
    assert torch.equal(again.train_feats, d.train_feats)
    assert torch.get_num_threads() == before


def test_interrupted_build_leaves_nothing_trusted(tmp_path, monkeypatch):
    cfg = tiny(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sw, "learn_bpe", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sw.build_shapesworld(cfg, progress=False)
    assert not (tmp_path / "tokenizers").exists()
    monkeypatch.undo()
    monkeypatch.setattr(shapes_clip, "pretrain_clip", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sw.build_shapesworld(cfg, progress=False)
    assert not (tmp_path / "clip.pt").exists() and not (tmp_path / "clip.json").exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    monkeypatch.undo()
    sw.build_shapesworld(cfg, progress=False)
    assert set(sw.load_report(cfg)["timings_s"]) == {"clip", "embeddings"}
