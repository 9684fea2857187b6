"""Tests of cgtgan.py: shapes of every module, the rewards' equations, learning signals.

Everything runs on tiny random models and a synthetic CaptionData built here (`tiny_world`):
sentences from a small grammar, byte-level BPE tokenizers trained on them, and a tiny random CLIP
whose embeddings stand in for the image and text features.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import config
import decoding
from cgtgan import (IGNORE_INDEX, build_discriminator, build_generator, caption_loss,
                    clip_agg_reward, clip_agg_target, clip_cos_reward, discriminator_loss,
                    encode_sentences, lambda_schedule, naturalness_reward, sample_categorical,
                    scst_loss, semantic_reward)
from config import Config, ConfigError, DiscriminatorConfig, GeneratorConfig, apply_overrides

COLOURS = ["red", "blue", "green", "yellow"]
SHAPES = ["circle", "square", "star"]
RELATIONS = ["above", "below", "left of", "right of"]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = f"a {rng.choice(COLOURS)} {rng.choice(SHAPES)}"
        out.append(a if rng.random() < 0.3 else
                   f"{a} {rng.choice(RELATIONS)} a {rng.choice(COLOURS)} {rng.choice(SHAPES)}")
    return out


def write_tokenizers(root: Path, corpus: list[str]) -> tuple[Path, Path]:
    """GPT-2 and RoBERTa tokenizer directories (byte-level BPE trained on the corpus)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast, RobertaTokenizerFast

    dirs = []
    for name, cls, specials in [("gpt2", GPT2TokenizerFast, ["<|endoftext|>"]),
                                ("roberta", RobertaTokenizerFast,
                                 ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])]:
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(corpus + ["."], vocab_size=300, min_frequency=1,
                                special_tokens=specials, show_progress=False)
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        bpe.save_model(str(d))
        tok = cls.from_pretrained(str(d))
        assert len(tok) > 0
        tok.save_pretrained(str(d))
        dirs.append(d)
    return dirs[0], dirs[1]


def tiny_world(root: Path, n_train: int = 24, n_eval: int = 6, n_corpus: int = 60):
    """A synthetic CaptionData with a tiny random CLIP: images are solid colour squares."""
    import clip_model
    import clip_tokenizer
    from data import CaptionData, EvalSplit
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    corpus = sentences(n_corpus, seed=1)
    gpt2_dir, roberta_dir = write_tokenizers(root, corpus)
    bpe = root / "clip_merges.txt"
    clip_tokenizer.write_merges(bpe, [("r", "e"), ("c", "i"), ("s", "q")])
    tok = clip_tokenizer.Tokenizer(str(bpe))
    torch.manual_seed(0)
    clip = clip_model.CLIP(clip_model.CLIPConfig(
        embed_dim=16, image_resolution=16, vision_layers=1, vision_width=64, vision_patch_size=8,
        context_length=48, vocab_size=tok.vocab_size, transformer_width=64, transformer_heads=1,
        transformer_layers=1)).eval()
    clip_path = root / "clip.pt"
    clip_model.save(clip, clip_path)
    palette = [(200, 30, 30), (30, 30, 200), (30, 180, 30), (220, 220, 40)]
    ids = [f"img{i}" for i in range(n_train + 2 * n_eval)]
    images = {i: Image.new("RGB", (16, 16), palette[k % 4]) for k, i in enumerate(ids)}
    pre = clip_model.Preprocess(16)
    with torch.no_grad():
        img = F.normalize(clip.encode_image(pre([images[i] for i in ids])), dim=-1)
        txt = F.normalize(clip.encode_text(clip_tokenizer.tokenize(corpus, 48, tokenizer=tok)), dim=-1)
    refs = sentences(2 * n_eval * 2, seed=2)
    split = lambda a, b: EvalSplit(ids[a:b], img[a:b].clone(),
                                   {i: refs[2 * j:2 * j + 2] for j, i in enumerate(ids[a:b])})
    return CaptionData(
        name="tiny", clip_path=clip_path, clip_bpe_path=bpe, gpt2_path=gpt2_dir,
        roberta_path=roberta_dir, train_ids=ids[:n_train], train_feats=img[:n_train].clone(),
        corpus=corpus, corpus_feats=txt, splits={"val": split(n_train, n_train + n_eval),
                                                 "test": split(n_train + n_eval, len(ids))},
        image_loader=images.__getitem__,
        checker=lambda caps, split: {"fluency": 0.5, "faithfulness": 0.5}).validate()


def tiny_config(**overrides) -> Config:
    cfg = Config()
    apply_overrides(cfg, {
        "gen.n_layer": 1, "gen.n_embd": 32, "gen.n_head": 2, "gen.prefix_len": 2,
        "gen.max_len": 8, "disc.n_layer": 1, "disc.hidden": 32, "disc.n_head": 2,
        "disc.dropout": 0.0, "init.steps": 6, "init.batch": 8, "gan.steps": 4, "gan.batch": 3,
        "gan.k": 2, "gan.eval_every": 2, "gan.ckpt_every": 2, "gan.lambda_hold": 1,
        "gan.lambda_ramp": 2, "threads": 0, **overrides})
    return cfg


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture()
def models(world):
    from cgtgan import load_tokenizer

    cfg = tiny_config()
    gtok = load_tokenizer(world.gpt2_path, "GPT-2")
    dtok = load_tokenizer(world.roberta_path, "RoBERTa")
    torch.manual_seed(0)
    gen = build_generator(cfg.gen, gtok, world.train_feats.shape[1])
    disc = build_discriminator(cfg.disc, dtok)
    return gen, gtok, disc, dtok


# ----------------------------------------------------------------------------------------------
# Shapes


def test_mapping_and_generator_shapes(models):
    gen, gtok, _, _ = models
    feats = F.normalize(torch.randn(3, 16), dim=-1)
    assert gen.mapping(feats).shape == (3, 2, 32)  # (B, P, E)
    tokens = torch.randint(len(gtok), (3, 5))
    assert gen(feats, tokens).shape == (3, 5, len(gtok))  # (B, T, V)
    ids, mask = gen.greedy(feats)
    assert ids.shape == mask.shape and ids.shape[0] == 3 and ids.shape[1] <= 8
    ids, logp, mask = gen.sample(feats, 4)
    assert ids.shape[:2] == (3, 4) and logp.shape == ids.shape == mask.shape
    assert logp.requires_grad
    ids, mask = gen.beam_search(feats, beams=2)
    assert ids.shape[0] == 3 and ids.shape[1] <= 8


def test_decoding_stops_at_end_token(models):
    gen, _, _, _ = models
    with torch.no_grad():
        gen.gpt.lm_head.weight.zero_()
        gen.gpt.lm_head.weight[gen.end_id] = 1.0  # make "." the only likely token
        gen.gpt.transformer.ln_f.bias.fill_(1.0)
    ids, mask = gen.greedy(torch.randn(2, 16))
    assert ids.shape == (2, 1) and (ids == gen.end_id).all() and mask.sum() == 2


def test_discriminator_shapes(models):
    _, _, disc, dtok = models
    batch = dtok(["a red circle", "a blue star above a green square"], padding=True,
                 return_tensors="pt")
    assert disc(batch["input_ids"], batch["attention_mask"]).shape == (2,)


# ----------------------------------------------------------------------------------------------
# Sampling is exact and its log-probs are the model's


def test_sample_logprobs_equal_forward_logprobs(models):
    gen, _, _, _ = models
    feats = F.normalize(torch.randn(2, 16), dim=-1)
    ids, logp, mask = gen.sample(feats, 3, generator=torch.Generator().manual_seed(0))
    flat_ids = ids.flatten(0, 1)  # (B*K, T)
    logits = gen(feats.repeat_interleave(3, 0), flat_ids)  # (B*K, T, V)
    ref = logits.log_softmax(-1).gather(-1, flat_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(logp.flatten(0, 1), ref * mask.flatten(0, 1), atol=1e-5, rtol=1e-5)
    # Each caption ends at the first end token: nothing after it is counted.
    for row, m in zip(flat_ids.tolist(), mask.flatten(0, 1).tolist()):
        n = int(sum(m))
        assert gen.end_id not in row[:n - 1]


def test_sample_categorical_matches_distribution():
    logits = torch.tensor([[0.0, 1.0, -1.0, float("-inf")]]).repeat(40000, 1)
    draws = sample_categorical(logits, torch.rand(len(logits), generator=torch.Generator().manual_seed(0)))
    assert sample_categorical(torch.tensor([[0.2, 0.5, 0.3]]).log(), torch.tensor([0.65])) == 1
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.01, rtol=0)
    assert (draws != 3).all()


# ----------------------------------------------------------------------------------------------
# Decoding: the lean KV-cache step equals transformers' GPT-2 forward


def tiny_gpt2(**extra):
    """A random 2-layer GPT-2 with the released model's defaults (gelu_new, dropout 0.1)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**{"vocab_size": 60, "n_positions": 16, "n_embd": 32,
                                         "n_layer": 2, "n_head": 4, **extra})).eval()


@pytest.mark.parametrize("extra", [{}, {"scale_attn_by_inverse_layer_idx": True,
                                        "activation_function": "relu", "n_inner": 40}])
def test_lean_cache_logits_equal_full_forward(extra):
    # GPT-2 124M's settings (gelu_new, scale_attn_weights) and a variant; rows 1 then 0 finish
    # early, so the cache drops rows between steps as _decode does.
    gpt = tiny_gpt2(**extra)
    embeds = torch.randn(4, 3, 32)  # (N, P, E)
    lean, hf = decoding.LeanCache(gpt, max_new=6), decoding.HFCache(gpt)
    with torch.no_grad():
        logits = lean.start(embeds)  # (N, V)
        torch.testing.assert_close(logits, hf.start(embeds), atol=1e-5, rtol=1e-5)
        for t in range(6):
            # Reference: the full forward over every embedding so far, no cache.
            torch.testing.assert_close(logits, gpt(inputs_embeds=embeds).logits[:, -1],
                                       atol=1e-5, rtol=1e-5)
            token = logits.argmax(-1)  # (n,)
            if t in (1, 3):
                rows = torch.tensor([i for i in range(len(token)) if i != 3 - t])  # (n-1,)
                lean.keep(rows)
                hf.keep(rows)
                embeds, token = embeds[rows], token[rows]
            embeds = torch.cat([embeds, gpt.transformer.wte(token)[:, None]], 1)  # (n, P+t+1, E)
            logits = lean.step(token)  # (n, V)
            torch.testing.assert_close(logits, hf.step(token), atol=1e-5, rtol=1e-5)
    assert logits.shape == (2, 60)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_lean_cache_under_bf16_autocast(device):
    gpt = tiny_gpt2().to(device)
    embeds = torch.randn(4, 3, 32, device=device)  # (N, P, E)
    lean, hf = decoding.LeanCache(gpt, max_new=3), decoding.HFCache(gpt)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        a, b = lean.start(embeds), hf.start(embeds)  # (N, V)
        for _ in range(3):
            assert a.dtype == b.dtype == torch.bfloat16 and a.device == embeds.device
            torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
            a, b = lean.step(a.argmax(-1)), hf.step(a.argmax(-1))


def test_lean_cache_refuses_what_it_cannot_reproduce():
    assert isinstance(decoding.kv_cache(tiny_gpt2(), 4), decoding.LeanCache)
    assert isinstance(decoding.kv_cache(tiny_gpt2(reorder_and_upcast_attn=True), 4),
                      decoding.HFCache)
    dropout = tiny_gpt2(resid_pdrop=0.1)
    assert decoding.lean_supported(dropout)  # eval mode: dropout is off
    assert not decoding.lean_supported(dropout.train())
    no_dropout = tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).train()
    assert decoding.lean_supported(no_dropout)  # p = 0: training mode changes nothing


def naive_decode(gen, feats: torch.Tensor, uniforms=None, greedy_rows=None) -> torch.Tensor:
    """Reference decoder: reruns the full forward over prefix + tokens each step, never stops.

    Argmax, or sample_categorical at uniforms (N, T) for rows not in greedy_rows. -> (N, T).
    """
    tokens = torch.zeros(len(feats), 0, dtype=torch.long)  # (N, 0)
    with torch.no_grad():
        for t in range(gen.max_len):
            embeds = torch.cat([gen.mapping(feats), gen.gpt.transformer.wte(tokens)], 1)  # (N, P+t, E)
            logits = gen.gpt(inputs_embeds=embeds).logits[:, -1]  # (N, V)
            token = logits.argmax(-1)  # (N,)
            if uniforms is not None:
                token = torch.where(greedy_rows, token, sample_categorical(logits, uniforms[:, t]))
            tokens = torch.cat([tokens, token[:, None]], 1)  # (N, t+1)
    return tokens


def cut_at_end(ids: torch.Tensor, end_id: int) -> list[list[int]]:
    """Token rows (N, T) -> lists that stop after the first end token."""
    out = []
    for row in ids.tolist():
        out.append(row[:row.index(end_id) + 1] if end_id in row else row)
    return out


def test_greedy_equals_naive_argmax_loop(models):
    gen = models[0]
    feats = F.normalize(torch.randn(6, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    endless = naive_decode(gen, feats)  # (N, T)
    gen.end_id = endless[0, 2].item()  # row 0 ends by its third token: ragged finishing
    ids, mask = gen.greedy(feats)
    assert [r[:int(m.sum())] for r, m in zip(ids.tolist(), mask)] == cut_at_end(endless, gen.end_id)
    assert len(set(mask.sum(1).tolist())) > 1


def test_sample_with_fixed_uniforms_equals_references(models, monkeypatch):
    gen = models[0]
    feats = F.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(2)), dim=-1)
    uniforms = torch.rand(4, 2, gen.max_len, generator=torch.Generator().manual_seed(3))  # (B, K, T)
    endless = naive_decode(gen, feats.repeat_interleave(2, 0), uniforms.flatten(0, 1),
                           torch.zeros(8, dtype=torch.bool))  # (B*K, T)
    gen.end_id = endless[0, 3].item()
    ids, logp, mask = gen.sample(feats, 2, uniforms)  # (B, K, T)
    got = [r[:int(m.sum())] for r, m in zip(ids.flatten(0, 1).tolist(), mask.flatten(0, 1))]
    assert got == cut_at_end(endless, gen.end_id)
    assert len(set(mask.flatten(0, 1).sum(1).tolist())) > 1
    # The same numbers give the same captions through transformers' forward and cache.
    monkeypatch.setattr(decoding, "lean_supported", lambda gpt: False)
    hf_ids, _, hf_mask = gen.sample(feats, 2, uniforms)
    assert torch.equal(hf_ids, ids) and torch.equal(hf_mask, mask)
    # A caption depends on its own numbers alone: the first image's samples, drawn on their own,
    # are the same as in the batch (so a data-parallel shard reproduces one process).
    one_ids, _, one_mask = gen.sample(feats[:1], 2, uniforms[:1])
    assert torch.equal(one_ids, ids[:1, :, :one_ids.shape[2]])


# ----------------------------------------------------------------------------------------------
# Rewards and losses: equations against direct computations


def test_clip_agg_target_equals_float64_direct():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(5, 24), dim=-1)
    corpus = F.normalize(torch.randn(1000, 24), dim=-1)
    for t in (1.0, 100.0, 175.0):
        got = clip_agg_target(img, corpus, t, image_chunk=2, corpus_chunk=97)
        w = (t * img.double() @ corpus.double().T).softmax(-1)  # (B, M)
        torch.testing.assert_close(got.double(), w @ corpus.double(), atol=1e-5, rtol=1e-4)


def test_clip_rewards_worked_examples():
    v = torch.tensor([[1.0, 0.0]])
    caps = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])  # (B=1, K=2, D=2)
    torch.testing.assert_close(clip_cos_reward(v, caps), torch.tensor([[100.0, 0.0]]))
    agg = clip_agg_reward(v, caps)
    # identical directions: 50 + 50; orthogonal: 0 + 50 * (1 - mean(|1-0|, |0-1|)) = 0
    torch.testing.assert_close(agg, torch.tensor([[100.0, 0.0]]))
    torch.testing.assert_close(semantic_reward(torch.tensor(10.0), torch.tensor(20.0), 0.25),
                               torch.tensor(12.5))  # 0.25 * 20 + 0.75 * 10
    logits = torch.tensor([2.0, -1.0], requires_grad=True)
    assert not naturalness_reward(logits).requires_grad
    torch.testing.assert_close(naturalness_reward(logits), torch.tensor([2.0, -1.0]))


def test_scst_loss_greedy_and_leave_one_out():
    logp = torch.tensor([[[-1.0, -3.0], [-4.0, 0.0]]])  # (B=1, K=2, T=2)
    mask = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])  # sample 1 has one token: its padding is 0.0
    reward = torch.tensor([[3.0, 1.0]])
    # Mean log-probs over each caption's own tokens: [-2, -4].
    # greedy baseline 2: advantages [1, -1] -> -(1 * -2 + -1 * -4) / 2 = -1
    torch.testing.assert_close(scst_loss(logp, mask, reward, torch.tensor([2.0])),
                               torch.tensor(-1.0))
    # leave-one-out: baselines [1, 3], advantages [2, -2] -> -(2 * -2 + -2 * -4) / 2 = -2
    torch.testing.assert_close(scst_loss(logp, mask, reward), torch.tensor(-2.0))
    # baseline 0: advantages [3, 1] -> -(3 * -2 + 1 * -4) / 2 = 5
    torch.testing.assert_close(scst_loss(logp, mask, reward, torch.tensor([0.0])),
                               torch.tensor(5.0))


def test_lambda_schedule():
    assert lambda_schedule(50, 100, 200) == 0.0
    assert lambda_schedule(100, 100, 200) == 0.0
    assert lambda_schedule(200, 100, 200) == pytest.approx(0.25)
    assert lambda_schedule(400, 100, 200) == 0.5
    assert lambda_schedule(10_000, 100, 200) == 0.5
    assert lambda_schedule(5, 0, 0, final=0.7) == 0.7


def test_caption_loss_ignores_padding():
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[1, 2, IGNORE_INDEX], [3, IGNORE_INDEX, IGNORE_INDEX]])
    ref = F.cross_entropy(logits[[0, 0, 1], [0, 1, 0]], torch.tensor([1, 2, 3]))
    torch.testing.assert_close(caption_loss(logits, labels), ref)


# ----------------------------------------------------------------------------------------------
# Learning signals


def test_positive_advantage_raises_sample_logprob(models):
    gen, _, _, _ = models
    feats = F.normalize(torch.randn(1, 16), dim=-1)
    ids, logp, mask = gen.sample(feats, 2, generator=torch.Generator().manual_seed(1))
    before = (logp.detach() * mask).sum(-1) / mask.sum(-1)  # (1, 2)
    opt = torch.optim.SGD(gen.parameters(), lr=0.1)
    loss = scst_loss(logp, mask, torch.tensor([[1.0, 0.0]]), torch.tensor([0.0]))
    opt.zero_grad()
    loss.backward()
    opt.step()
    after_lp = gen.log_probs(feats.repeat(2, 1), ids[0]) * mask[0]
    after = after_lp.sum(-1) / mask[0].sum(-1)
    assert after[0] > before[0, 0]


def test_discriminator_loss_falls_when_overfitting(models):
    _, _, disc, dtok = models
    real = ["a red circle above a blue square", "a green star", "a yellow square left of a red star"]
    fake = ["circle circle red", "a a a", "square above above"]
    batch = dtok(real + fake, padding=True, return_tensors="pt")
    opt = torch.optim.AdamW(disc.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        logits = disc(batch["input_ids"], batch["attention_mask"])
        loss, stats = discriminator_loss(logits[:3], logits[3:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0] and stats["d_acc"] == 1.0


def test_text_only_init_learns(world, models):
    gen, gtok, _, _ = models
    ids, labels = encode_sentences(gtok, world.corpus[:8], gen.end_id, gen.max_len)
    assert (labels[:, 0] != IGNORE_INDEX).all() and ids.shape == labels.shape
    opt = torch.optim.AdamW(gen.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = caption_loss(gen(world.corpus_feats[:8], ids), labels)
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


# ----------------------------------------------------------------------------------------------
# Configs


def test_overrides_are_checked():
    cfg = apply_overrides(Config(), {"gan.lr": "3e-4", "gan.steps": "7", "bf16": "true",
                                     "world.n_train": "10", "gan.reward": "agg",
                                     "real.agg_temperature": "none"})
    assert cfg.gan.lr == 3e-4 and cfg.gan.steps == 7 and cfg.bf16 is True
    assert cfg.world.n_train == 10 and cfg.gan.reward == config.Reward.AGG
    assert cfg.real.agg_temperature is None
    with pytest.raises(ConfigError, match="world.n_train takes an int"):
        apply_overrides(Config(), {"world.n_train": "ten"})
    with pytest.raises(ConfigError, match="gan.reward must be one of cos, agg, agg\\+gan, gan"):
        apply_overrides(Config(), {"gan.reward": "clip"})
    with pytest.raises(ConfigError, match="world.corpus_style must be one of"):
        apply_overrides(Config(), {"world.corpus_style": "bogus"})
    with pytest.raises(ConfigError, match="unknown config key 'gan.nope'"):
        apply_overrides(Config(), {"gan.nope": "1"})
    with pytest.raises(ConfigError, match="gan.steps takes an int"):
        apply_overrides(Config(), {"gan.steps": "1.5"})
    with pytest.raises(ConfigError, match="bf16 takes true or false"):
        apply_overrides(Config(), {"bf16": "maybe"})
    from dataclasses import asdict
    assert config.config_from_dict(asdict(cfg)) == cfg
    assert config.config_from_dict(json.loads(json.dumps(asdict(cfg)))) == cfg


def test_presets_apply():
    for name, preset in config.PRESETS.items():
        cfg = apply_overrides(Config(), preset)
        assert cfg.gen.prefix_len == 10 and cfg.gan.k == 5 and cfg.gan.batch == 128
    assert apply_overrides(Config(), config.PRESETS["coco-gcc"]).gan.temperature == 175.0


def test_missing_pretrained_model_is_named(tmp_path, models):
    _, gtok, _, _ = models
    with pytest.raises(ConfigError, match="GPT-2 not found at .*`hf download gpt2 --local-dir "):
        build_generator(GeneratorConfig(pretrained=str(tmp_path / "nope")), gtok, 16)
    with pytest.raises(ConfigError, match="RoBERTa not found"):
        build_discriminator(DiscriminatorConfig(pretrained=str(tmp_path / "nope")), gtok)


def test_pretrained_generator_takes_the_configured_dropout(tmp_path, models):
    # Released GPT-2 ships p = 0.1; gen.dropout must reach the modules, not only the config, or
    # the samples would be drawn with dropout (and by the slower transformers path).
    _, gtok, _, _ = models
    tiny_gpt2(vocab_size=len(gtok)).save_pretrained(tmp_path / "gpt2")
    gen = build_generator(GeneratorConfig(pretrained=str(tmp_path / "gpt2")), gtok, 16).train()
    assert {m.p for m in gen.gpt.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}
    assert decoding.lean_supported(gen.gpt)


def test_clip_text_memo_keeps_every_caption_of_a_call_when_it_overflows(world):
    """A full memo is emptied before a call's lookup, never between the lookup and the encoding:
    with room for 4 strings, a call of 3 cached and 2 new captions still returns all 5."""
    import clip_model
    import clip_tokenizer
    from cgtgan import ClipText

    clip, _ = clip_model.load(str(world.clip_path))
    encode = ClipText(clip, clip_tokenizer.Tokenizer(str(world.clip_bpe_path)), "cpu", max_cache=4)
    first = encode(["a red circle", "a blue star", "a green square"])  # (3, D)
    both = encode(["a red circle", "a blue star", "a green square", "a red star", "a blue circle"])
    assert both.shape == (5, first.shape[1]) and len(encode.cache) <= 5
    torch.testing.assert_close(both[:3], first)
    torch.testing.assert_close(encode(["a red star"]), both[3:4])
