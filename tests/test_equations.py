"""Tests that fail whenever the method is wrong: every equation of cgtgan.py and the CgT-GAN step of
train.py pinned by worked values and directions, not only by shapes.

Each test names the mistake it guards against: logits read one position late, the discriminator's
labels flipped, a reward's scale or sign changed, padding inside a mean, gradient leaking into the
advantage, an image's reward taken against another image. docs/mutation.md reports how many
mutants of these functions the tests kill (mutmut) and why the survivors are equivalent.
"""
from __future__ import annotations

import copy
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cgtgan
import runs
import train
from cgtgan import (IGNORE_INDEX, caption_loss, clip_agg_reward, clip_agg_target, clip_cos_reward,
                    decode_captions, discriminator_loss, lambda_schedule, naturalness_reward,
                    sample_categorical, scst_loss, semantic_reward, token_log_probs)
from config import GANConfig, Reward
from test_cgtgan import models, tiny_config, tiny_world  # noqa: F401 (models is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tiny_world(tmp_path_factory.mktemp("tiny_world_equations"))


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(),
                               atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------------------
# The generator: teacher forcing reads the logits of the right positions


def test_forward_logits_equal_step_by_step_full_forward(models):
    # logits[:, i] must be what the decoder predicts after prefix + tokens[:, :i]: the output at
    # position P-1+i. Read one position late ([:, P:]) and every comparison below fails.
    gen = models[0].eval()
    feats = F.normalize(torch.randn(3, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    tokens = torch.randint(len(models[1]), (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = gen(feats, tokens)  # (N, T, V)
        logp = gen.log_probs(feats, tokens)  # (N, T)
        for i in range(tokens.shape[1]):
            embeds = torch.cat([gen.mapping(feats), gen.gpt.transformer.wte(tokens[:, :i])], 1)
            step = gen.gpt(inputs_embeds=embeds).logits[:, -1]  # (N, V)
            close(logits[:, i], step)
            close(logp[:, i], step.log_softmax(-1).gather(1, tokens[:, i:i + 1]).squeeze(1))
    assert logits.shape == (3, 5, len(models[1]))


def test_token_log_probs_worked_example():
    # probabilities (0.25, 0.75) and (0.5, 0.5) scaled by any constant in log space
    logits = torch.tensor([[[0.0, math.log(3.0)], [7.0, 7.0]]], dtype=torch.bfloat16)  # (1, 2, 2)
    got = token_log_probs(logits, torch.tensor([[1, 0]]))
    assert got.dtype == torch.float32 and got.shape == (1, 2)
    close(got, torch.tensor([[math.log(0.75), math.log(0.5)]]), tol=1e-2)


def test_sample_categorical_inverts_the_cdf():
    # probabilities (0.2, 0.5, 0.3): CDF (0.2, 0.7, 1.0); each uniform falls in one interval.
    logits = torch.tensor([[0.2, 0.5, 0.3]]).log().repeat(6, 1)
    u = torch.tensor([0.0, 0.1, 0.3, 0.65, 0.75, 0.999])
    assert sample_categorical(logits, u).tolist() == [0, 0, 1, 1, 2, 2]
    # u = 1 (outside [0, 1), reached by rounding) still names the last token, never V.
    assert sample_categorical(logits[:1], torch.tensor([1.0])).tolist() == [2]
    # A token of probability 0 owns an empty interval: u = 0 skips it.
    zero_first = torch.tensor([[float("-inf"), 0.0, 0.0]])
    assert sample_categorical(zero_first, torch.tensor([0.0])).tolist() == [1]


def ragged_end(gen, feats, uniforms):
    """Picks an end token that the sampled captions reach at different lengths."""
    ids, _, _ = gen.sample(feats, uniforms.shape[1], uniforms)
    gen.end_id = ids[0, 0, 2].item()


def test_sample_log_probs_are_masked_and_carry_gradient(models):
    gen = models[0]
    feats = F.normalize(torch.randn(2, 16, generator=torch.Generator().manual_seed(4)), dim=-1)
    uniforms = torch.rand(2, 3, gen.max_len, generator=torch.Generator().manual_seed(5))
    ragged_end(gen, feats, uniforms)
    ids, logp, mask = gen.sample(feats, 3, uniforms)  # (B, K, T)
    lengths = mask.sum(-1)  # (B, K)
    assert len(set(lengths.flatten().tolist())) > 1 and mask.dtype == torch.float32
    assert (logp[mask == 0] == 0).all() and (logp[mask == 1] < 0).all()
    # Each caption's log-probs are the teacher-forced ones of its own image.
    for b in range(2):
        ref = gen.log_probs(feats[b:b + 1].expand(3, -1), ids[b])  # (K, T)
        close(logp[b], ref * mask[b])
    logp.sum().backward()
    assert gen.mapping.model[0].weight.grad.abs().sum() > 0
    # The same generator seed gives the same captions; uniforms decide them.
    a = gen.sample(feats, 3, generator=torch.Generator().manual_seed(7))[0]
    b = gen.sample(feats, 3, generator=torch.Generator().manual_seed(7))[0]
    assert torch.equal(a, b)


def test_greedy_is_the_argmax_of_the_full_forward(models):
    gen = models[0].eval()
    feats = F.normalize(torch.randn(2, 16, generator=torch.Generator().manual_seed(6)), dim=-1)
    ids, mask = gen.greedy(feats)
    assert not ids.requires_grad and mask.dtype == torch.float32
    for row, m, f in zip(ids, mask, feats):
        n = int(m.sum())
        with torch.no_grad():
            logits = gen(f[None].expand(1, -1), row[None, :n])[0]  # (n, V)
        assert logits.argmax(-1).tolist() == row[:n].tolist()


# ----------------------------------------------------------------------------------------------
# The discriminator: logit > 0 means real, and real sentences earn the higher reward


def test_discriminator_loss_worked_values():
    real = torch.tensor([2.0, -1.0, 0.5], requires_grad=True)
    fake = torch.tensor([-3.0, 0.5], requires_grad=True)
    loss, stats = discriminator_loss(real, fake)
    # BCE: -log sigmoid(x) for real (label 1), -log(1 - sigmoid(x)) for fake (label 0)
    softplus = lambda x: math.log1p(math.exp(x))
    want = 0.5 * ((softplus(-2) + softplus(1) + softplus(-0.5)) / 3 + (softplus(-3) + softplus(0.5)) / 2)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert stats["d_loss"] == pytest.approx(want, rel=1e-6)
    assert stats["d_acc"] == pytest.approx(0.5 * (2 / 3 + 1 / 2))
    loss.backward()
    # Lowering the loss raises the real logits and lowers the fake ones.
    assert (real.grad < 0).all() and (fake.grad > 0).all()
    # A logit of exactly 0 is undecided: right for neither side.
    assert discriminator_loss(torch.zeros(2), torch.zeros(2))[1]["d_acc"] == 0.0
    assert discriminator_loss(torch.zeros(2), torch.zeros(2))[0].item() == pytest.approx(math.log(2))


def test_trained_discriminator_rewards_real_sentences(models):
    # Flip the labels (and the accuracy with them) and D learns the opposite: fake captions would
    # then earn the higher naturalness reward, and this test fails.
    _, _, disc, dtok = models
    real = ["a red circle above a blue square", "a green star", "a yellow square left of a red star"]
    fake = ["circle circle red", "a a a", "square above above"]
    batch = dtok(real + fake, padding=True, return_tensors="pt")
    opt = torch.optim.AdamW(disc.parameters(), lr=3e-3)
    for _ in range(15):
        logits = disc(batch["input_ids"], batch["attention_mask"])
        loss, stats = discriminator_loss(logits[:3], logits[3:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        reward = naturalness_reward(disc(batch["input_ids"], batch["attention_mask"]))
    assert reward[:3].min() > 0 > reward[3:].max()


def test_naturalness_reward_is_the_detached_float_logit():
    logits = torch.tensor([2.0, -1.0], dtype=torch.bfloat16, requires_grad=True)
    reward = naturalness_reward(logits)
    assert reward.dtype == torch.float32 and not reward.requires_grad
    assert reward.tolist() == [2.0, -1.0]


# ----------------------------------------------------------------------------------------------
# CLIP rewards: scale 100, the 0.5/0.5 mix, each caption against its own image


def test_clip_cos_reward_scale_and_per_image():
    # cos((3, 4), (4, 3)) = 24/25; the inputs are normalised inside, so lengths do not matter.
    v = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # (B=2, D=2)
    caps = torch.tensor([[[8.0, 6.0], [0.0, -1.0]], [[8.0, 6.0], [0.0, -1.0]]])  # (B, K=2, D)
    close(clip_cos_reward(v, caps), torch.tensor([[96.0, -80.0], [60.0, -100.0]]))
    # Swapping the images swaps the rows of rewards.
    close(clip_cos_reward(v.flip(0), caps), torch.tensor([[60.0, -100.0], [96.0, -80.0]]))


def test_clip_agg_reward_worked_value():
    # a = (1, 0), t = (1, 1)/sqrt 2: cos = 0.7071, mean |a - t| = (0.2929 + 0.7071) / 2 = 0.5
    # -> 50 * 0.7071 + 50 * (1 - 0.5) = 60.355. Unnormalised inputs give the same.
    target = torch.tensor([[0.3, 0.0], [0.0, 5.0]])  # (B=2, D)
    caps = torch.tensor([[[2.0, 2.0], [1.0, 0.0]], [[2.0, 2.0], [1.0, 0.0]]])  # (B, K=2, D)
    s = 50 * math.sqrt(0.5) + 25
    # (1, 0) vs (0, 1): cos 0, mean |a - t| = 1 -> 0
    close(clip_agg_reward(target, caps), torch.tensor([[s, 100.0], [s, 0.0]]))
    # cos -1 and mean |a - t| = 1 (D = 2) -> 50 * -1 + 50 * 0 = -50: the terms are weighted 0.5/0.5
    close(clip_agg_reward(torch.tensor([[1.0, 0.0]]), torch.tensor([[[-1.0, 0.0]]])),
          torch.tensor([[-50.0]]))
    # D = 3, t = (1, 0, 0), c = (0, 1, 0): cos 0, mean |a - t| = 2/3 -> 50/3
    close(clip_agg_reward(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[[0.0, 1.0, 0.0]]])),
          torch.tensor([[50 / 3]]))


def test_semantic_reward_mixes_by_weight():
    cos, agg = torch.tensor([10.0, -4.0]), torch.tensor([20.0, 8.0])
    close(semantic_reward(cos, agg, 0.25), torch.tensor([12.5, -1.0]))  # 0.25 * agg + 0.75 * cos
    close(semantic_reward(cos, agg, 0.0), cos)
    close(semantic_reward(cos, agg, 1.0), agg)


def test_clip_agg_target_worked_example_and_chunks(capsys):
    corpus = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # s_1 = e_1, s_2 = e_2
    image = torch.tensor([[3.0, 0.0], [2.0, 2.0], [0.0, 1.0]])
    got = clip_agg_target(image, corpus, 100.0)
    close(got, torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]))
    # The temperature sharpens: t = 1 and v = e_1 weight e_1 by e / (e + 1).
    close(clip_agg_target(image[:1], corpus * 4, 1.0), torch.tensor([[math.e, 1.0]]) / (math.e + 1))
    # Online softmax over chunks (the running maximum grows mid-corpus) equals the direct one,
    # for numpy input too, and prints nothing unless asked.
    g = torch.Generator().manual_seed(0)
    img, sents = torch.randn(5, 6, generator=g), torch.randn(40, 6, generator=g)
    sents[17] = 3 * img[0]  # image 0's nearest sentence, in a later chunk
    w = (30.0 * F.normalize(img, dim=-1) @ F.normalize(sents, dim=-1).T).softmax(-1)  # (N, M)
    want = w @ F.normalize(sents, dim=-1)
    capsys.readouterr()
    close(clip_agg_target(img.numpy(), sents.numpy(), 30.0, image_chunk=2, corpus_chunk=7), want)
    assert capsys.readouterr().err == ""
    clip_agg_target(img, sents, 30.0, corpus_chunk=7, progress=True)
    err = capsys.readouterr().err
    assert re.search(r"(^|\r)CLIP-agg targets: ", err) and "6/6 [" in err and "chunk/s]" in err
    with pytest.raises(ValueError, match="must be non-empty and 6 wide"):
        clip_agg_target(img, sents[:, :5], 30.0)
    with pytest.raises(ValueError, match="must be non-empty"):
        clip_agg_target(img, np.zeros((0, 6), dtype=np.float32), 30.0)


# ----------------------------------------------------------------------------------------------
# The self-critical loss: advantage sign, no gradient into rewards, padding left out


def test_scst_loss_worked_value_and_gradient():
    logp = torch.tensor([[[-1.0, -3.0], [-2.0, 0.0]],
                         [[-0.5, -0.5], [-4.0, -1.0]]], requires_grad=True)  # (B=2, K=2, T=2)
    mask = torch.tensor([[[1.0, 1.0], [1.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
    reward = torch.tensor([[3.0, 1.0], [0.0, 5.0]], requires_grad=True)
    baseline = torch.tensor([2.0, 1.0], requires_grad=True)  # each image's own greedy reward
    # advantages [[1, -1], [-1, 4]]; mean log-probs [[-2, -2], [-0.5, -2.5]]
    # -> -(1*-2 + -1*-2 + -1*-0.5 + 4*-2.5) / 4 = 9.5 / 4
    loss = scst_loss(logp, mask, reward, baseline)
    assert loss.item() == pytest.approx(9.5 / 4)
    loss.backward()
    # Rewards are constants of the policy gradient: no gradient reaches them.
    assert reward.grad is None and baseline.grad is None
    # d loss / d logp = -advantage / (caption length * B * K): up for a positive advantage.
    want = -torch.tensor([[[1 / 2, 1 / 2], [-1.0, 0.0]], [[-1 / 2, -1 / 2], [4 / 2, 4 / 2]]]) / 4
    close(logp.grad, want)


def test_scst_loss_leaves_padding_out():
    logp = torch.tensor([[[-1.0, -3.0, -0.5], [-2.0, -7.0, -9.0]]])  # (B=1, K=2, T=3)
    mask = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])
    reward, baseline = torch.tensor([[2.0, -1.0]]), torch.tensor([0.5])
    loss = scst_loss(logp, mask, reward, baseline)
    # advantages [1.5, -1.5], mean log-probs [-2, -2] (a one-token caption counts its one token)
    assert loss.item() == pytest.approx(-(1.5 * -2 + -1.5 * -2) / 2)
    padded = logp.clone()
    padded[mask == 0] = -100.0
    assert scst_loss(padded, mask, reward, baseline).item() == pytest.approx(loss.item())
    # An empty caption (mask all zero) contributes 0, not NaN.
    assert scst_loss(logp, torch.zeros_like(mask), reward, baseline).item() == 0.0


def test_scst_loss_leave_one_out_baseline():
    logp = torch.tensor([[[-1.0], [-2.0], [-3.0]], [[-1.0], [-1.0], [-2.0]]])  # (B=2, K=3, T=1)
    mask = torch.ones_like(logp)
    reward = torch.tensor([[6.0, 0.0, 3.0], [10.0, 10.0, 40.0]])
    # Each image's samples only: baselines [1.5, 4.5, 3.0] and [25, 25, 10]; advantages
    # [4.5, -4.5, 0] and [-15, -15, 30] -> -(-4.5 + 9 + 0 + 15 + 15 - 60) / 6 = 25.5 / 6
    assert scst_loss(logp, mask, reward).item() == pytest.approx(25.5 / 6)
    assert scst_loss(logp[:1], mask[:1], reward[:1], torch.tensor([3.0])).item() == pytest.approx(
        -(3 * -1 + -3 * -2 + 0) / 3)


def test_caption_log_prob_is_the_mean_over_real_tokens_per_caption():
    logp = torch.tensor([[-1.0, -3.0, -50.0], [-2.0, -50.0, -50.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    got = cgtgan.caption_log_prob(logp, mask)
    close(got, torch.tensor([-2.0, -2.0]))  # not -18 (padding in the mean), not -4/3 (over T)
    got.sum().backward()
    close(logp.grad, torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]))  # 1 / length, 0 on padding
    assert cgtgan.caption_log_prob(logp.detach()[None], mask[None]).shape == (1, 2)


def test_generator_loss_worked_example_each_term_its_own_baseline():
    logp = torch.tensor([[[-1.0, -1.0], [-2.0, -2.0]]])  # (1, 2, 2): mean log-probs (-1, -2)
    mask = torch.ones(1, 2, 2)
    r_sem, r_nat = torch.tensor([[60.0, 40.0, 50.0]]), torch.tensor([[1.0, 3.0, 2.0]])
    loss, stats = cgtgan.generator_loss(logp, mask, r_sem, r_nat, 0.25)
    assert stats == pytest.approx({"loss_sem": -5.0, "loss_nat": 0.5})
    assert loss.item() == pytest.approx(0.25 * -5.0 + 0.75 * 0.5)  # lam on the semantic side
    loss, stats = cgtgan.generator_loss(logp, mask, r_sem, r_nat, 0.25, "loo")
    assert stats == pytest.approx({"loss_sem": -10.0, "loss_nat": 1.0})  # greedy column unused


def test_caption_loss_worked_value_and_padding():
    logits = torch.zeros(1, 3, 4)  # uniform over V = 4: every counted token costs log 4
    logits[0, 0, 2] = math.log(3.0)  # token 2 at position 0 has probability 3/6
    labels = torch.tensor([[2, 1, IGNORE_INDEX]])
    want = (math.log(2.0) + math.log(4.0)) / 2
    assert caption_loss(logits, labels).item() == pytest.approx(want)
    logits[0, 2] = torch.tensor([9.0, -9.0, 4.0, 0.0])  # a padding position: not counted
    assert caption_loss(logits, labels).item() == pytest.approx(want)


# ----------------------------------------------------------------------------------------------
# lambda: the schedule at its boundaries, and per reward


def test_lambda_schedule_boundaries():
    hold, ramp = 10, 4
    assert [lambda_schedule(s, hold, ramp) for s in (0, hold - 1, hold, hold + 1, hold + 2,
                                                    hold + ramp - 1, hold + ramp, hold + ramp + 1,
                                                    10_000)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5])
    assert lambda_schedule(hold + 2, hold, ramp, final=0.8) == pytest.approx(0.4)
    # ramp = 0: a step from 0 to final at hold.
    assert [lambda_schedule(s, 3, 0, final=0.7) for s in (2, 3, 4)] == [0.0, 0.7, 0.7]
    # ramp = 1: 0 at hold, final one step later.
    assert [lambda_schedule(s, 3, 1, final=0.7) for s in (2, 3, 4)] == [0.0, 0.0, 0.7]


def test_reward_lambda_follows_the_schedule_per_reward():
    gan = GANConfig(lambda_hold=2, lambda_ramp=4, lambda_final=0.6, reward=Reward("agg+gan"))
    assert [train.reward_lambda(gan, s) for s in (0, 1, 2, 3, 6, 50)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.15, 0.6, 0.6])
    # The ablations use one reward at full weight at every step.
    for reward, lam in (("cos", 1.0), ("agg", 1.0), ("gan", 0.0)):
        cfg = GANConfig(lambda_hold=2, lambda_ramp=4, reward=Reward(reward))
        assert [train.reward_lambda(cfg, s) for s in (0, 3, 50)] == [lam] * 3


def test_with_baseline_keeps_rows_with_their_image():
    b, k = 2, 3
    x = torch.arange(b * k + b).float()[:, None] * torch.tensor([1.0, -1.0])  # (B*K + B, 2)
    got = train.with_baseline(x, b, k)  # (B, K+1, 2)
    assert got.shape == (2, 4, 2)
    assert got[..., 0].tolist() == [[0, 1, 2, 6], [3, 4, 5, 7]]
    assert torch.equal(got[..., 1], -got[..., 0])


# ----------------------------------------------------------------------------------------------
# train.update: fresh gradients, clipped at grad_clip, averaged over processes first


def test_update_clips_fresh_gradients():
    module = torch.nn.Module()
    module.lin = lin = torch.nn.Linear(3, 1, bias=False)
    # A parameter without a gradient this step is left alone, weight decay included.
    module.unused = unused = torch.nn.Parameter(torch.ones(2))
    x = torch.tensor([[3.0, 4.0, 0.0]])  # gradient of 10 * w.x is (30, 40, 0), norm 50
    run = SimpleNamespace(distributed=False, world_size=1)
    for clip, scale in ((5.0, 0.1), (100.0, 1.0)):
        opt = torch.optim.SGD(module.parameters(), lr=1.0, weight_decay=0.5)
        before = lin.weight.detach().clone()
        for p in module.parameters():
            p.grad = torch.full_like(p, 1000.0)  # a stale gradient must not be added
        train.update(run, opt, module, 10 * lin(x).sum(), clip)
        close(lin.weight - before, -scale * torch.tensor([[30.0, 40.0, 0.0]]) - 0.5 * before,
              tol=1e-4)
        assert torch.equal(unused, torch.ones(2))


def test_update_averages_before_clipping(monkeypatch):
    seen = []

    def halve(module, world_size):
        seen.append((module, world_size))
        for p in module.parameters():
            p.grad /= world_size

    monkeypatch.setattr(train, "average_gradients", halve)
    lin = torch.nn.Linear(2, 1, bias=False)
    before = lin.weight.detach().clone()
    opt = torch.optim.SGD(lin.parameters(), lr=1.0)
    x = torch.tensor([[6.0, 8.0]])  # gradient (6, 8), norm 10; averaged over 2: norm 5
    train.update(SimpleNamespace(distributed=True, world_size=2), opt, lin, lin(x).sum(), 5.0)
    assert seen == [(lin, 2)]
    close(lin.weight - before, -torch.tensor([[3.0, 4.0]]), tol=1e-4)


# ----------------------------------------------------------------------------------------------
# gan_step: one CgT-GAN step on the tiny world, every term recomputed independently


def spy(monkeypatch, name: str, module=train) -> list:
    """Records (args, result) of each call of <module>.<name> (train's by default), which still
    runs."""
    calls, original = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((args, out))
        return out

    monkeypatch.setattr(module, name, wrapper)
    return calls


def reference_rewards(run, gen, disc, batch):
    """Captions, CLIP rewards (B, K+1) and D's logits (B, K+1) of one step, computed per image
    from copies of the models taken before the step, without train.py's helpers."""
    cfg, k = run.cfg.gan, run.cfg.gan.k
    tok, b = run.gpt2_tokenizer, batch.feats.shape[0]
    with torch.no_grad():
        ids, logp, mask = gen.sample(batch.feats, k, batch.uniforms)  # (B, K, T)
        greedy_ids, greedy_mask = gen.greedy(batch.feats)
    samples = decode_captions(tok, ids.flatten(0, 1), mask.flatten(0, 1), gen.end_id)
    greedy = decode_captions(tok, greedy_ids, greedy_mask, gen.end_id)
    tokens = run.roberta_tokenizer(samples + greedy, padding=True, return_tensors="pt")
    with torch.no_grad():
        d = disc(tokens["input_ids"], tokens["attention_mask"])  # (B*K + B,)
    w = cfg.agg_weight if cfg.reward.semantic == "agg" else 0.0
    r_cos, r_agg, r_sem, r_nat = (torch.zeros(b, k + 1) for _ in range(4))
    for i in range(b):
        texts = samples[i * k:(i + 1) * k] + [greedy[i]]
        emb = F.normalize(run.clip_text(texts), dim=-1)  # (K+1, D)
        v, a = F.normalize(batch.feats[i], dim=0), F.normalize(batch.agg_targets[i], dim=0)
        r_cos[i] = 100 * emb @ v
        r_agg[i] = 50 * emb @ a + 50 * (1 - (emb - a).abs().mean(-1))
        r_sem[i] = w * r_agg[i] + (1 - w) * r_cos[i]
        r_nat[i] = torch.cat([d[i * k:(i + 1) * k], d[b * k + i:b * k + i + 1]])
    return SimpleNamespace(ids=ids, logp=logp, mask=mask, samples=samples, greedy=greedy, r_cos=r_cos, r_agg=r_agg,
                           r_sem=r_sem, r_nat=r_nat, d_fake=d[:b * k])


@pytest.mark.parametrize("sets", [{"gan.agg_weight": "0.5"},
                                  {"gan.reward": "cos", "gan.baseline": "loo"}])
def test_gan_step_terms_equal_independent_recomputation(world, monkeypatch, sets):
    run = runs.build_run(tiny_config(**sets), world)
    cfg, k, step = run.cfg.gan, run.cfg.gan.k, 2
    opt_g = train.adamw(run.generator, cfg.lr, cfg.weight_decay)
    opt_d = train.adamw(run.discriminator, cfg.d_lr, cfg.weight_decay)
    batch = train.draw_batch(run, train.agg_targets(run), torch.Generator().manual_seed(0))
    b = batch.feats.shape[0]
    assert b >= 2 and not torch.allclose(batch.feats[0], batch.feats[1])
    # An end token that image 0's greedy caption and its first sample reach (by drawing the
    # argmax at each step) but not the other samples: decoding must strip it from both kinds.
    gen, n = run.generator, 3
    greedy_ids, _ = gen.greedy(batch.feats[:1])
    gen.end_id = greedy_ids[0, n - 1].item()
    with torch.no_grad():
        cdf = gen(batch.feats[:1], greedy_ids[:, :n])[0].softmax(-1).cumsum(-1)  # (n, V)
    hi = cdf.gather(1, greedy_ids[0, :n, None]).squeeze(1)  # (n,) the argmax's CDF interval
    lo = hi - cdf.diff(dim=1, prepend=torch.zeros(n, 1)).gather(1, greedy_ids[0, :n, None]).squeeze(1)
    batch.uniforms[0, 0, :n] = (lo + hi) / 2
    gen0, disc0 = copy.deepcopy(run.generator), copy.deepcopy(run.discriminator)
    ref = reference_rewards(run, gen0, disc0, batch)
    assert len(set(ref.mask.sum(-1).flatten().tolist())) > 1 and len(ref.greedy[0].split()) < n
    g_calls, d_calls, updates = (spy(monkeypatch, n) for n in ("generator_loss",
                                                                "discriminator_loss", "update"))
    scst = spy(monkeypatch, "scst_loss", cgtgan)  # generator_loss's two terms

    stats = train.gan_step(run, opt_g, opt_d, batch, step)

    lam = train.reward_lambda(cfg, step)
    assert stats["lambda"] == lam == (0.25 if cfg.reward.naturalness else 1.0)
    # Rewards: the semantic one, then naturalness, each sample against its own image's greedy
    # caption (or the other samples, with baseline=loo).
    (g_args, _), = g_calls
    assert g_args[4] == lam and g_args[5] == cfg.baseline
    (sem_args, loss_sem), (nat_args, loss_nat) = scst
    for args, r in ((sem_args, ref.r_sem), (nat_args, ref.r_nat)):
        close(args[0], ref.logp)
        assert torch.equal(args[1], ref.mask)
        close(args[2], r[:, :k], tol=1e-4)
        if cfg.baseline == "loo":
            assert len(args) == 3 or args[3] is None
        else:
            close(args[3], r[:, k], tol=1e-4)
    assert set(stats) == {"loss_g", "loss_sem", "loss_nat", "d_loss", "d_acc", "lambda", "r_cos",
                          "r_agg", "r_nat", "r_sem", "len", "example"}
    assert stats["r_agg"] == pytest.approx(ref.r_agg[:, :k].mean().item(), abs=1e-4)
    assert stats["r_cos"] == pytest.approx(ref.r_cos[:, :k].mean().item(), abs=1e-4)
    assert stats["r_sem"] == pytest.approx(ref.r_sem[:, :k].mean().item(), abs=1e-4)
    assert stats["r_nat"] == pytest.approx(ref.r_nat[:, :k].mean().item(), abs=1e-5)
    assert stats["len"] == pytest.approx(ref.mask.sum(-1).mean().item())
    assert stats["example"] == ref.samples[0]
    # The discriminator: corpus sentences real, this step's samples (not greedy captions) fake.
    tokens = run.roberta_tokenizer(batch.real, padding=True, return_tensors="pt")
    with torch.no_grad():
        d_real = disc0(tokens["input_ids"], tokens["attention_mask"])
    (d_args, (d_loss, _)), = d_calls
    close(d_args[0], d_real)
    close(d_args[1], ref.d_fake)
    assert stats["d_loss"] == pytest.approx(d_loss.item())
    # G's loss is the lambda mix; D's step then G's step, each with its own optimiser.
    assert stats["loss_sem"] == pytest.approx(loss_sem.item())
    assert stats["loss_nat"] == pytest.approx(loss_nat.item())
    assert stats["loss_g"] == pytest.approx(lam * loss_sem.item() + (1 - lam) * loss_nat.item(),
                                            rel=1e-5, abs=1e-6)
    (d_update, _), (g_update, _) = updates
    assert d_update[:3] == (run, opt_d, run.discriminator) and d_update[3] is d_loss
    assert g_update[:3] == (run, opt_g, run.generator) and d_update[4] == g_update[4] == cfg.grad_clip
    assert g_update[3].item() == pytest.approx(stats["loss_g"])
    for before, after in ((gen0, run.generator), (disc0, run.discriminator)):
        changed = [not torch.equal(p, q) for p, q in zip(before.parameters(), after.parameters())]
        assert sum(changed) > len(changed) // 2


# ----------------------------------------------------------------------------------------------
# The official recipe's switches: raw CLIP-agg vectors, clipping off, G's warm-up, D's dropout


def test_clip_agg_reward_raw_worked_value():
    # Official code: cos and L1 on the raw vectors. a = (2, 0); captions (4, 0), (0, 1), (2, 0):
    # cos 1, 0, 1; mean |a - c| = 1, 1.5, 0 -> 50 + 0, 0 - 25, 50 + 50.
    target = torch.tensor([[2.0, 0.0]])  # (B=1, D=2)
    caption = torch.tensor([[[4.0, 0.0], [0.0, 1.0], [2.0, 0.0]]])  # (B=1, K=3, D=2)
    close(clip_agg_reward(target, caption, raw=True), torch.tensor([[50.0, -25.0, 100.0]]))
    # Ours (the default): both normalised first, so (4, 0) and (2, 0) are the target's direction.
    close(clip_agg_reward(target, caption), torch.tensor([[100.0, 0.0, 100.0]]))


def test_update_with_clipping_off_and_below_one():
    lin = torch.nn.Linear(3, 1, bias=False)
    x = torch.tensor([[3.0, 4.0, 0.0]])  # gradient of 10 * w.x is (30, 40, 0), norm 50
    run = SimpleNamespace(distributed=False, world_size=1)
    for clip, scale in ((0.0, 1.0), (0.5, 0.01)):  # 0: the official init does not clip
        opt = torch.optim.SGD(lin.parameters(), lr=1.0)
        before = lin.weight.detach().clone()
        train.update(run, opt, lin, 10 * lin(x).sum(), clip)
        close(lin.weight - before, -scale * torch.tensor([[30.0, 40.0, 0.0]]), tol=1e-4)


def test_gan_step_passes_the_recipe_switches(world, monkeypatch):
    """With the discriminator's dropout on, G's warm-up and raw CLIP-agg vectors, gan_step runs
    the grouped discriminator path, sets G's learning rate by the warm-up and asks for raw
    CLIP-agg rewards."""
    run = runs.build_run(tiny_config(**{"disc.dropout": "0.1", "gan.warmup": "10",
                                        "gan.batch": "4"}), world)
    cfg, step = run.cfg.gan, 2
    batch = train.draw_batch(run, train.agg_targets(run), torch.Generator().manual_seed(0))
    cfg.agg_raw = True
    raw_flags = []
    reward = train.clip_agg_reward
    monkeypatch.setattr(train, "clip_agg_reward",
                        lambda a, c, raw=False: raw_flags.append(raw) or reward(a, c, raw=raw))
    opt_g = train.adamw(run.generator, cfg.lr, cfg.weight_decay)
    opt_d = train.adamw(run.discriminator, cfg.d_lr, cfg.weight_decay)
    before = [p.detach().clone() for p in run.discriminator.parameters()]
    stats = train.gan_step(run, opt_g, opt_d, batch, step)
    assert raw_flags == [True] and math.isfinite(stats["loss_g"])
    assert opt_g.param_groups[0]["lr"] == pytest.approx(cfg.lr * step / 10)
    assert any(not torch.equal(p, q) for p, q in zip(before, run.discriminator.parameters()))
