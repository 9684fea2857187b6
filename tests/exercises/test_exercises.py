"""The exercise grader: each student function against fixed worked examples and the reference.

Run one exercise with `CGTGAN_STUDENT=my_solution.py python -m pytest tests/exercises -k NAME`
(NAME as in docs/exercises.md). Each test is named `test_<NAME>_<what it checks>`: the fixed
examples come first (they say what is wrong in words), then seeded random inputs compared with
the reference implementation (values, and gradients where the function is a loss).
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import evaluate

ATOL = 1e-5


def check_close(got, want, what: str, atol: float = ATOL, rtol: float = 1e-5,
                mistakes: dict | None = None) -> None:
    """Fail with the quantity, the shapes, the worst entry and both values when they differ; when
    `got` equals what a known mistake computes (mistakes: {what to say: its value}), say that."""
    want = torch.as_tensor(want, dtype=torch.float64)
    if not isinstance(got, torch.Tensor):
        try:
            got = torch.as_tensor(got, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            pytest.fail(f"{what}: expected a tensor or number, got {type(got).__name__}", pytrace=False)
    got = got.detach().double()
    if got.shape != want.shape:
        pytest.fail(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}", pytrace=False)
    if not torch.isfinite(got).all():
        pytest.fail(f"{what}: contains NaN or inf (expected {want.flatten()[:4].tolist()} ...); "
                    "is an exp() overflowing or a division by zero?", pytrace=False)
    diff = (got - want).abs()
    bad = diff > atol + rtol * want.abs()
    for advice, value in (mistakes or {}).items():
        value = torch.as_tensor(value, dtype=torch.float64)
        if bad.any() and value.shape == got.shape and torch.allclose(got, value, atol=atol, rtol=rtol):
            pytest.fail(f"{what}: {advice}", pytrace=False)
    if bad.any():
        i = int(diff.flatten().argmax())
        index = tuple(torch.unravel_index(torch.tensor(i), want.shape)) if want.dim() else ()
        index = tuple(int(j) for j in index)
        pytest.fail(f"{what}: {int(bad.sum())} of {want.numel()} entries differ; worst at "
                    f"{index}: got {got.flatten()[i].item():.6g}, expected "
                    f"{want.flatten()[i].item():.6g}", pytrace=False)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# 1. clip_cos_reward(image (B, D), caption (B, K, D)) -> (B, K)


def test_clip_cos_reward_worked_example(student):
    f = student("clip_cos_reward")
    image = torch.tensor([[1.0, 0.0]])  # (1, 2)
    captions = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0], [3.0, 0.0]]])
    check_close(f(image, captions), [[100.0, 0.0, -100.0, 100 / math.sqrt(2), 100.0]],
                "r_cos for image e1 and captions e1, e2, -e1, e1+e2, 3*e1 (normalise both first)",
                atol=1e-4)


def test_clip_cos_reward_random(student, reference):
    f = student("clip_cos_reward")
    g = seeded(1)
    image, caption = torch.randn(3, 8, generator=g) * 4, torch.randn(3, 5, 8, generator=g)
    check_close(f(image, caption), reference.clip_cos_reward(image, caption),
                "r_cos on random (B=3, K=5, D=8) embeddings", atol=1e-4)


# ----------------------------------------------------------------------------------------------
# 2. clip_agg_target(image (B, D), corpus (M, D), t) -> (B, D)


def test_clip_agg_target_worked_example(student):
    f = student("clip_agg_target")
    corpus = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    image = torch.tensor([[1.0, 0.0]])
    check_close(f(image, corpus, 0.0), [[0.5, 0.5]],
                "agg at t = 0 (uniform weights: the corpus mean)")
    check_close(f(image, corpus, 100.0), [[1.0, 0.0]],
                "agg at t = 100 for image e1 over corpus {e1, e2} (the nearest sentence dominates)")
    w = 1 / (1 + math.exp(-1.0))  # softmax(1 * (1, 0)) = (w, 1 - w)
    check_close(f(image, corpus * 5, 1.0), [[w, 1 - w]],
                "agg at t = 1 over a corpus of norm 5 (normalise the corpus rows first)")
    # Rows (3, 4) and (0, 1) normalise to (0.6, 0.8) and (0, 1); at t = 0 the target is their mean.
    corpus = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    check_close(f(image, corpus, 0.0), [[0.3, 0.9]], "agg at t = 0 over corpus [[3, 4], [0, 1]] "
                "(the mean of the unit sentences)", mistakes=_agg_mistakes(image, corpus, 0.0))


WRONG_AXIS = ("you normalised the corpus along dim 0 (each column); a sentence is a row of corpus "
              "(M, D): normalise along dim -1")


def _agg_mistakes(image, corpus, t) -> dict:
    """What clip_agg_target computes with the corpus normalised along the wrong axis."""
    v = torch.nn.functional.normalize(image.double(), dim=-1)
    s = torch.nn.functional.normalize(corpus.double(), dim=0)
    return {WRONG_AXIS: (t * v @ s.T).softmax(-1) @ s}


def test_clip_agg_target_random(student, reference):
    f = student("clip_agg_target")
    g = seeded(2)
    image, corpus = torch.randn(4, 16, generator=g) * 3, torch.randn(50, 16, generator=g) * 2
    for t in (1.0, 10.0, 100.0):
        want = reference.clip_agg_target(image, corpus, t)
        check_close(f(image, corpus, t), want, f"agg on random (B=4, M=50, D=16), t={t}", atol=1e-5,
                    mistakes=_agg_mistakes(image, corpus, t))
    # The reference itself against the equation in float64 (a direct softmax).
    v = torch.nn.functional.normalize(image.double(), dim=-1)
    s = torch.nn.functional.normalize(corpus.double(), dim=-1)
    check_close(reference.clip_agg_target(image, corpus, 10.0), (10 * v @ s.T).softmax(-1) @ s,
                "reference agg vs a float64 softmax", atol=1e-5)


def test_clip_agg_target_stable_at_high_temperature(student, reference):
    f = student("clip_agg_target")
    g = seeded(3)
    image, corpus = torch.randn(3, 8, generator=g), torch.randn(200, 8, generator=g)
    check_close(f(image, corpus, 1000.0), reference.clip_agg_target(image, corpus, 1000.0),
                "agg at t = 1000 (exp(1000) overflows: subtract the row maximum before exp)",
                atol=1e-4, mistakes=_agg_mistakes(image, corpus, 1000.0))


# ----------------------------------------------------------------------------------------------
# 3. clip_agg_reward(target (B, D), caption (B, K, D)) -> (B, K)


def test_clip_agg_reward_worked_example(student):
    f = student("clip_agg_reward")
    target = torch.tensor([[1.0, 0.0]])
    captions = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    # e1: cos 1, L1 0 -> 100. e2: cos 0, mean|e1 - e2| = 1 -> 0. -e1: cos -1, mean L1 1 -> -50.
    check_close(f(target, captions), [[100.0, 0.0, -50.0]],
                "r_agg for target e1 and captions e1, e2, -e1", atol=1e-4)
    check_close(f(target * 0.3, captions[:, :1] * 2), [[100.0]],
                "r_agg for target 0.3*e1 and caption 2*e1 (normalise both before cos and L1)",
                atol=1e-4)


def test_clip_agg_reward_random(student, reference):
    f = student("clip_agg_reward")
    g = seeded(4)
    target, caption = torch.randn(3, 8, generator=g) * 0.2, torch.randn(3, 5, 8, generator=g)
    check_close(f(target, caption), reference.clip_agg_reward(target, caption),
                "r_agg on random (B=3, K=5, D=8) embeddings", atol=1e-4)


# ----------------------------------------------------------------------------------------------
# 4. scst_loss(logp (B, K, T), mask (B, K, T), reward (B, K), baseline (B,) or None) -> scalar


def test_scst_loss_worked_example(student):
    f = student("scst_loss")
    logp = torch.tensor([[[-1.0, -1.0], [-2.0, -50.0]]])  # (1, 2, 2); -50 sits after the end
    mask = torch.tensor([[[1.0, 1.0], [1.0, 0.0]]])
    reward, baseline = torch.tensor([[3.0, 1.0]]), torch.tensor([2.0])
    # advantages (1, -1), mean log-probs (-1, -2): loss = -(1 * -1 + -1 * -2) / 2 = -0.5
    check_close(f(logp, mask, reward, baseline), -0.5,
                "loss for rewards (3, 1), greedy baseline 2, mean log-probs (-1, -2) over the mask")
    # Leave-one-out: sample 0's baseline is 1, sample 1's is 3: advantages (2, -2) -> -1.0
    check_close(f(logp, mask, reward, None), -1.0,
                "loss with baseline=None (leave-one-out mean of the other samples)")


def padded_log_probs(g: torch.Generator, b: int, k: int, t: int):
    """Random token log-probs (B, K, T) in (-5, 0] and a mask (B, K, T) of 1-T real tokens per
    caption, padding after them: the inputs of the log-prob exercises' random tests."""
    logp = -torch.rand(b, k, t, generator=g) * 5
    lengths = torch.randint(1, t + 1, (b, k), generator=g)
    return logp, (torch.arange(t) < lengths[..., None]).float()


def test_scst_loss_random_values_and_gradients(student, reference):
    f = student("scst_loss")
    g = seeded(5)
    B, K, T = 3, 4, 6
    logp0, mask = padded_log_probs(g, B, K, T)
    reward, baseline = torch.randn(B, K, generator=g) * 10, torch.randn(B, generator=g) * 10
    for base in (baseline, None):
        name = "greedy baseline" if base is not None else "leave-one-out baseline"
        got, (got_grad,) = f.grad(logp0, mask, reward, base, wrt=(0,))
        want, (want_grad,) = reference.scst_loss.grad(logp0, mask, reward, base, wrt=(0,))
        check_close(got, want, f"loss on random (B={B}, K={K}, T={T}), {name}")
        check_close(got_grad, want_grad, f"d loss / d logp, {name}", mistakes={
            "no gradient reaches logp: detach only the advantage (r - b), not the log-probabilities":
            torch.zeros_like(want_grad)})


def test_scst_loss_advantage_is_detached(student):
    f = student("scst_loss")
    g = seeded(12)
    logp, reward, baseline = -torch.rand(2, 3, 4, generator=g), torch.randn(2, 3, generator=g), torch.randn(2, generator=g)
    _, grads = f.grad(logp, torch.ones(2, 3, 4), reward, baseline, wrt=(0, 2, 3))
    for name, grad in zip(("reward", "baseline"), grads[1:]):
        if grad.abs().max() > 0:
            pytest.fail(f"the loss sends gradient into the {name}: the advantage (r - b) is a "
                        "constant weight, detach it", pytrace=False)


# ----------------------------------------------------------------------------------------------
# 5. discriminator_loss(real_logits (N,), fake_logits (N',)) -> (loss, {"d_loss", "d_acc"})


def test_discriminator_loss_worked_example(student):
    f = student("discriminator_loss")
    loss, stats = f(torch.tensor([0.0]), torch.tensor([0.0]))
    check_close(loss, math.log(2), "loss when D outputs logit 0 for everything (log 2)")
    check_close(stats["d_acc"], 0.0, "d_acc when no logit is on the right side of 0")
    loss, stats = f(torch.tensor([2.0, -1.0]), torch.tensor([-3.0, -1.0, 1.0, -2.0]))
    check_close(stats["d_acc"], 0.5 * (1 / 2 + 3 / 4), "d_acc = mean of real and fake accuracies")
    check_close(stats["d_loss"], loss, "stats['d_loss'] equals the loss")
    loss, _ = f(torch.tensor([-100.0]), torch.tensor([-100.0]))
    check_close(loss, 50.0, "loss for real logit -100 (use a log-sigmoid that does not overflow)",
                atol=1e-3)


def test_discriminator_loss_random_values_and_gradients(student, reference):
    f = student("discriminator_loss")
    g = seeded(6)
    real0, fake0 = torch.randn(7, generator=g) * 3, torch.randn(13, generator=g) * 3
    (got, got_stats), got_grads = f.grad(real0, fake0, wrt=(0, 1))
    (want, want_stats), want_grads = reference.discriminator_loss.grad(real0, fake0, wrt=(0, 1))
    check_close(got, want, "loss on 7 real and 13 fake logits (average the two halves' means)")
    for key in ("d_loss", "d_acc"):
        check_close(got_stats[key], want_stats[key], f"stats[{key!r}]")
    check_close(got_grads[0], want_grads[0], "d loss / d real_logits")
    check_close(got_grads[1], want_grads[1], "d loss / d fake_logits")


# ----------------------------------------------------------------------------------------------
# 6. lambda_schedule(step, hold, ramp, final=0.5) -> float


def test_lambda_schedule_worked_example(student):
    f = student("lambda_schedule")
    for step, want in ((0, 0.0), (50, 0.0), (99, 0.0), (100, 0.0), (200, 0.25), (300, 0.5),
                       (400, 0.5), (10_000, 0.5)):
        check_close(f(step, 100, 200, 0.5), want, f"lambda at step {step} (hold 100, ramp 200)")
    check_close(f(5, 5, 0, 0.7), 0.7, "lambda with ramp 0 (a jump to final after the hold)")


def test_lambda_schedule_grid(student, reference):
    f = student("lambda_schedule")
    for hold in (0, 10, 150):
        for ramp in (0, 1, 50, 2350):
            for final in (0.5, 1.0):
                for step in (0, 1, 9, 10, 11, 60, 149, 150, 151, 1000, 3000):
                    check_close(f(step, hold, ramp, final), reference.lambda_schedule(
                        step, hold, ramp, final), f"lambda({step}, hold={hold}, ramp={ramp}, "
                        f"final={final})")


# ----------------------------------------------------------------------------------------------
# 7. caption_loss(logits (N, T, V), labels (N, T)) -> scalar; labels -1 are padding


def test_caption_loss_worked_example(student):
    f = student("caption_loss")
    logits = torch.zeros(1, 3, 4)  # uniform over V = 4 unless set: such a token costs log 4
    logits[0, 0, 0] = 2.0  # token 0 at position 0 costs -log(e^2 / (e^2 + 3)) = log(1 + 3 e^-2)
    logits[0, 1, 2] = 100.0  # position 1 is padding: a confident wrong guess must not count
    want = (math.log(1 + 3 * math.exp(-2)) + math.log(4)) / 2
    check_close(f(logits, torch.tensor([[0, -1, 3]])), want,
                "loss with labels (0, -1, 3): -1 is padding; 0 is a real token (GPT-2's '!')")


def test_caption_loss_random_values_and_gradients(student, reference):
    f = student("caption_loss")
    g = seeded(7)
    logits0 = torch.randn(4, 7, 11, generator=g) * 2
    labels = torch.randint(0, 11, (4, 7), generator=g)
    labels[torch.rand(4, 7, generator=g) < 0.3] = -1
    got, (got_grad,) = f.grad(logits0, labels, wrt=(0,))
    want, (want_grad,) = reference.caption_loss.grad(logits0, labels, wrt=(0,))
    check_close(got, want, "loss on random (N=4, T=7, V=11) with 30% padding")
    check_close(got_grad, want_grad, "d loss / d logits")


# ----------------------------------------------------------------------------------------------
# 8. contrastive_loss(logits_per_image (B, B)) -> scalar (CLIP's symmetric InfoNCE)


def test_contrastive_loss_worked_example(student):
    f = student("contrastive_loss")
    check_close(f(torch.tensor([[2.0, 0.0], [0.0, 2.0]])), math.log(1 + math.exp(-2)),
                "loss for logits [[2, 0], [0, 2]] (log(1 + e^-2))")


def test_contrastive_loss_random_values_and_gradients(student, reference):
    f = student("contrastive_loss")
    g = seeded(8)
    x0 = torch.randn(5, 5, generator=g) * 4  # not symmetric: the text-side term differs
    got, (got_grad,) = f.grad(x0, wrt=(0,))
    want, (want_grad,) = reference.contrastive_loss.grad(x0, wrt=(0,))
    check_close(got, want, "loss on random 5x5 logits (average image->text and text->image CE)")
    check_close(got_grad, want_grad, "d loss / d logits")


# ----------------------------------------------------------------------------------------------
# 9. tfidf_vector(counts [n x {gram: count}], df {gram: images}, n_images) -> [n x {gram: weight}]


def _check_vectors(got, want, what):
    if not isinstance(got, (list, tuple)) or len(got) != len(want):
        pytest.fail(f"{what}: expected a list of {len(want)} dicts (one per n-gram order), got "
                    f"{type(got).__name__} of length {len(got) if hasattr(got, '__len__') else '?'}",
                    pytrace=False)
    for k, (gk, wk) in enumerate(zip(got, want)):
        if set(gk) != set(wk):
            pytest.fail(f"{what}, order {k + 1}: n-grams {sorted(set(gk) ^ set(wk))[:3]} are in "
                        "one vector but not the other (one weight per n-gram of the caption)",
                        pytrace=False)
        for gram, w in wk.items():
            check_close(gk[gram], w, f"{what}, weight of {' '.join(gram)!r}", atol=1e-9)


def test_tfidf_vector_worked_example(student):
    f = student("tfidf_vector")
    counts = evaluate.ngrams("a dog a dog".split(), 2)
    df = {("a",): 2, ("dog",): 1, ("a", "dog"): 1, ("dog", "a"): 1}
    log2 = math.log(2)
    # "a" is in every image's references: idf 0. "dog" occurs twice: 2 * log 2.
    _check_vectors(f(counts, df, 2), [{("a",): 0.0, ("dog",): 2 * log2},
                                      {("a", "dog"): 2 * log2, ("dog", "a"): log2}],
                   "tf-idf of 'a dog a dog' over 2 images")
    _check_vectors(f(evaluate.ngrams(["zebra"], 1), {}, 4), [{("zebra",): math.log(4)}],
                   "tf-idf of an n-gram no reference contains (df 0 counts as 1)")


def _random_captions(rng: random.Random, n: int) -> list[list[str]]:
    words = "a the dog cat red blue on under small big".split()
    return [[rng.choice(words) for _ in range(rng.randint(1, 8))] for _ in range(n)]


def test_tfidf_vector_random(student, reference):
    f = student("tfidf_vector")
    rng = random.Random(9)
    refs = [_random_captions(rng, 3) for _ in range(20)]
    df = {}
    for image_refs in refs:
        for gram in {g for r in image_refs for order in evaluate.ngrams(r) for g in order}:
            df[gram] = df.get(gram, 0) + 1
    for i, caption in enumerate(_random_captions(rng, 10)):
        counts = evaluate.ngrams(caption)
        _check_vectors(f(counts, df, len(refs)), reference.tfidf_vector(counts, df, len(refs)),
                       f"tf-idf of random caption {i} ({' '.join(caption)!r})")


def _cider_d_from_vectors(vector, candidates, references, sigma=6.0):
    """CIDEr-D per image (evaluate.cider_d's formula), with the tf-idf step given by `vector`."""
    refs_counts = [[evaluate.ngrams(r) for r in refs] for refs in references]
    df = {}
    for image_refs in refs_counts:
        for gram in {g for r in image_refs for order in r for g in order}:
            df[gram] = df.get(gram, 0) + 1
    scores = []
    for cand, image_refs in zip(candidates, refs_counts):
        counts = evaluate.ngrams(cand)
        vc, total = vector(counts, df, len(references)), 0.0
        for r in image_refs:
            vr = vector(r, df, len(references))
            val = 0.0
            for ck, rk in zip(vc, vr):
                nc, nr = math.hypot(*ck.values()), math.hypot(*rk.values())
                if nc and nr:
                    val += sum(min(w, rk.get(g, 0.0)) * rk.get(g, 0.0) for g, w in ck.items()) / (nc * nr)
            delta = sum(counts[1].values()) - sum(r[1].values())
            total += val * math.exp(-delta * delta / (2 * sigma ** 2)) / 4
        scores.append(10 * total / len(image_refs))
    return scores


def test_tfidf_vector_gives_evaluate_cider_d(student, reference):
    f = student("tfidf_vector")
    rng = random.Random(10)
    references = [_random_captions(rng, 4) for _ in range(15)]
    candidates = _random_captions(rng, 15)[:10] + [refs[0] for refs in references[10:]]
    _, want = reference.cider_d(candidates, references)
    check_close(_cider_d_from_vectors(f, candidates, references), want,
                "CIDEr-D per image built on your tf-idf vectors vs evaluate.cider_d", atol=1e-9)


# ----------------------------------------------------------------------------------------------
# 10. bpe(word, ranks {(a, b): rank}) -> symbols (CLIP's BPE merge loop)


def test_bpe_worked_example(student):
    f = student("bpe")
    cases = [
        ("low", {("l", "o"): 0, ("lo", "w</w>"): 1}, ["low</w>"], "merge, then merge the result"),
        ("low", {("o", "w</w>"): 0, ("l", "o"): 1}, ["l", "ow</w>"],
         "the lowest-ranked pair goes first, not the leftmost"),
        ("aaaa", {("a", "a"): 0}, ["aa", "a", "a</w>"],
         "a pair is merged left to right without overlap; 'a a</w>' is another pair"),
        ("ababx", {("a", "b"): 1, ("ab", "a"): 0}, ["ab", "ab", "x</w>"], FIRST_ONLY),
        ("x", {("x", "y"): 0}, ["x</w>"], "a one-symbol word is just its end symbol"),
        ("cab", {}, ["c", "a", "b</w>"], "no merges: the symbols, the last one marked </w>"),
    ]
    for word, ranks, want, why in cases:
        got = f(word, dict(ranks))
        if list(got) != want:
            if list(got) == _bpe_first_only(word, ranks):
                why = FIRST_ONLY
            pytest.fail(f"bpe({word!r}, {ranks}) = {list(got)}, expected {want}: {why}",
                        pytrace=False)


FIRST_ONLY = ("merge every occurrence of the chosen pair in the same round, before looking at "
              "the ranks again (this result merges only its first occurrence)")


def _bpe_first_only(word: str, ranks: dict) -> list:
    """The mistake: each round merges only the first occurrence of the lowest-ranked pair."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = list(zip(parts, parts[1:]))
        best = min(pairs, key=lambda pair: ranks.get(pair, math.inf))
        if best not in ranks:
            return parts
        i = pairs.index(best)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _random_ranks(rng: random.Random, words: list[str]) -> dict:
    """A merge table learned on the words (as shapesworld.learn_bpe does), then partly shuffled,
    plus merges of pairs that never occur."""
    from shapesworld import learn_bpe

    merges = learn_bpe([" ".join(words)], max_merges=40)
    merges += [(rng.choice("abcde"), rng.choice("abcde") + rng.choice(["", "</w>"])) for _ in range(10)]
    for _ in range(len(merges) // 4):
        i, j = rng.randrange(len(merges)), rng.randrange(len(merges))
        merges[i], merges[j] = merges[j], merges[i]
    return {m: i for i, m in reversed(list(enumerate(merges)))}


def test_bpe_random(student, reference):
    f = student("bpe")
    rng = random.Random(11)
    for trial in range(20):
        words = ["".join(rng.choice("abcde") for _ in range(rng.randint(1, 9))) for _ in range(30)]
        ranks = _random_ranks(rng, words)
        for word in words[:10]:
            got, want = f(word, dict(ranks)), reference.bpe(word, ranks)
            if list(got) != want:
                why = f": {FIRST_ONLY}" if list(got) == _bpe_first_only(word, ranks) else ""
                pytest.fail(f"bpe({word!r}, <random table {trial}>) = {list(got)}, expected "
                            f"{want}{why}", pytrace=False)


# ----------------------------------------------------------------------------------------------
# 11. prefix_lm_logits(gpt, prefix (N, P, E), tokens (N, T)) -> logits (N, T, V)


def tiny_gpt2(seed: int, vocab: int = 13, width: int = 8):
    """A random GPT2LMHeadModel small enough to send to the worker (no dropout, eval mode)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=vocab, n_positions=16, n_embd=width, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)).eval()


ONE_LATE = ("one position late: your logits[:, i] come after token i, so they have seen the token "
            "they must predict (training would teach the model to copy its input); the output at "
            "position P-1+i, after the last prefix vector for i = 0, predicts token i")
ONE_EARLY = ("one position early: your logits[:, i] come before token i-1; the output at "
             "position P-1+i predicts token i")
NO_PREFIX = "GPT-2 never read the prefix: feed torch.cat([prefix, wte(tokens)], dim=1)"
PREFIX_LAST = "the prefix comes first, then the caption's tokens: cat([prefix, wte(tokens)], dim=1)"


@torch.no_grad()
def _prefix_lm_mistakes(gpt, prefix, tokens) -> dict:
    """What prefix_lm_logits returns with each known mistake (computed here, not by the student)."""
    p, t = prefix.shape[1], tokens.shape[1]
    words = gpt.transformer.wte(tokens)  # (N, T, E)
    full = gpt(inputs_embeds=torch.cat([prefix, words], 1)).logits  # (N, P+T, V)
    out = {ONE_LATE: full[:, p:], NO_PREFIX: gpt(inputs_embeds=words).logits,
           PREFIX_LAST: gpt(inputs_embeds=torch.cat([words, prefix], 1)).logits[:, p - 1:p - 1 + t]}
    if p >= 2:
        out[ONE_EARLY] = full[:, p - 2:-2]
    return out


def test_prefix_lm_logits_worked_example(student):
    f = student("prefix_lm_logits")
    gpt, g = tiny_gpt2(0), seeded(13)
    prefix, tokens = torch.randn(1, 2, 8, generator=g), torch.tensor([[3, 7, 5]])  # P = 2, T = 3
    got = f(gpt, prefix, tokens)
    if isinstance(got, torch.Tensor) and got.dim() == 3 and got.shape[1] == 5:
        pytest.fail("logits: 5 rows for P = 2 prefix vectors and T = 3 tokens; the prefix "
                    "positions carry no labels: return the T rows that predict the tokens",
                    pytrace=False)
    # Row i must be GPT-2's next-token prediction after the prefix and tokens[:, :i] alone.
    with torch.no_grad():
        want = torch.stack([gpt(inputs_embeds=torch.cat(
            [prefix, gpt.transformer.wte(tokens[:, :i])], 1)).logits[:, -1] for i in range(3)], 1)
    check_close(got, want, "logits for P = 2, tokens (3, 7, 5): row i is the prediction after "
                "the prefix and tokens[:, :i]", atol=1e-4,
                mistakes=_prefix_lm_mistakes(gpt, prefix, tokens))


def test_prefix_lm_logits_random_values_and_gradients(student, reference):
    f = student("prefix_lm_logits")
    g = seeded(14)
    for p, seed in ((1, 1), (3, 2)):
        gpt = tiny_gpt2(seed, vocab=17, width=12)
        prefix, tokens = torch.randn(4, p, 12, generator=g), torch.randint(17, (4, 6), generator=g)
        got, (got_grad,) = f.grad(gpt, prefix, tokens, wrt=(1,))
        want, (want_grad,) = reference.prefix_lm_logits.grad(gpt, prefix, tokens, wrt=(1,))
        check_close(got, want, f"logits on random (N=4, P={p}, T=6, V=17)", atol=1e-4,
                    mistakes=_prefix_lm_mistakes(gpt, prefix, tokens))
        check_close(got_grad, want_grad, f"d sum(logits) / d prefix (P={p})", atol=1e-4, mistakes={
            "no gradient reaches the prefix: the mapping network learns through it": 0 * want_grad})


# ----------------------------------------------------------------------------------------------
# 12. caption_log_prob(logp (..., T), mask (..., T)) -> (...)


def _log_prob_mistakes(logp, mask) -> dict:
    t = logp.shape[-1]
    return {"padding entered the mean: average over the caption's real tokens (mask), not all T":
            logp.double().mean(-1),
            "divided by T: the padding counts in the denominator; divide by the number of real "
            "tokens, mask.sum(-1)": (logp * mask).double().sum(-1) / t,
            "a sum: the paper averages over each caption's own tokens (divide by mask.sum(-1))":
            (logp * mask).double().sum(-1)}


def test_caption_log_prob_worked_example(student):
    f = student("caption_log_prob")
    logp = torch.tensor([[-1.0, -3.0, -50.0], [-2.0, -50.0, -50.0]])  # -50: after the end token
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    check_close(f(logp, mask), [-2.0, -2.0], "log-probs of captions (-1, -3 | pad) and (-2 | pad, "
                "pad): one value per caption, the mean over its real tokens",
                mistakes=_log_prob_mistakes(logp, mask))
    check_close(f(logp[None], mask[None]), [[-2.0, -2.0]], "the same captions as (B=1, K=2, T=3): "
                "reduce the last dimension only")


def test_caption_log_prob_random_values_and_gradients(student, reference):
    f = student("caption_log_prob")
    g = seeded(15)
    B, K, T = 3, 4, 7
    logp, mask = padded_log_probs(g, B, K, T)
    logp = torch.where(mask > 0, logp, torch.full_like(logp, -30.0))  # padding: large, finite
    got, (got_grad,) = f.grad(logp, mask, wrt=(0,))
    want, (want_grad,) = reference.caption_log_prob.grad(logp, mask, wrt=(0,))
    check_close(got, want, f"log-probs on random (B={B}, K={K}, T={T}) captions of lengths 1..{T}",
                mistakes=_log_prob_mistakes(logp, mask))
    if (got_grad * (1 - mask)).abs().max() > 0:
        pytest.fail("d log p / d logp is not 0 on padding: a token after the end must not count",
                    pytrace=False)
    check_close(got_grad, want_grad, "d sum(log p) / d logp (1 / length on each real token)")


# ----------------------------------------------------------------------------------------------
# 13. generator_loss(logp, mask (B, K, T), r_sem, r_nat (B, K+1), lam, baseline) -> (loss, stats)


SWAPPED_LAMBDA = ("lambda weighs the semantic term: L_G = lam * L_sem + (1 - lam) * L_nat (yours "
                  "has them the other way round)")
SHARED_BASELINE = ("each reward needs its own baseline: the semantic term against r_sem's greedy "
                   "reward, the naturalness term against r_nat's (a CLIP reward near 100 and a "
                   "logit near 0 share no baseline)")
GREEDY_FIRST = "the greedy caption's reward is the last column (index K), after the K samples"


def _scst(logp, mask, reward, baseline) -> float:
    """The self-critical loss, written out here (a release's cgtgan.scst_loss is a stub)."""
    if baseline is None:
        baseline = (reward.sum(1, keepdim=True) - reward) / (reward.shape[1] - 1)  # (B, K)
    else:
        baseline = baseline[:, None]  # (B, 1)
    mean_logp = (logp * mask).sum(-1) / mask.sum(-1)  # (B, K)
    return -((reward - baseline) * mean_logp).mean().item()


def _generator_mistakes(logp, mask, r_sem, r_nat, lam, baseline) -> dict:
    """L_G with each known mistake."""
    k, loo = logp.shape[1], baseline == "loo"
    sem = _scst(logp, mask, r_sem[:, :k], None if loo else r_sem[:, k])
    nat = _scst(logp, mask, r_nat[:, :k], None if loo else r_nat[:, k])
    out = {SWAPPED_LAMBDA: (1 - lam) * sem + lam * nat}
    if loo:
        out["baseline 'loo' is the mean of the other samples' rewards, not the greedy caption's"] = (
            lam * _scst(logp, mask, r_sem[:, :k], r_sem[:, k])
            + (1 - lam) * _scst(logp, mask, r_nat[:, :k], r_nat[:, k]))
        return out
    out[GREEDY_FIRST] = (lam * _scst(logp, mask, r_sem[:, 1:], r_sem[:, 0])
                         + (1 - lam) * _scst(logp, mask, r_nat[:, 1:], r_nat[:, 0]))
    for which, shared in (("r_sem's", r_sem[:, k]), ("r_nat's", r_nat[:, k])):
        out[f"{SHARED_BASELINE}; yours uses {which} greedy reward for both"] = (
            lam * _scst(logp, mask, r_sem[:, :k], shared)
            + (1 - lam) * _scst(logp, mask, r_nat[:, :k], shared))
    return out


def _check_generator(got, want, what: str, mistakes: dict) -> None:
    """(loss, stats) against the reference's: the loss first (with the known mistakes), then
    stats["loss_sem"] and stats["loss_nat"]."""
    if not (isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], dict)):
        pytest.fail(f"{what}: return (loss, {{'loss_sem': ..., 'loss_nat': ...}}), got "
                    f"{type(got).__name__}", pytrace=False)
    check_close(got[0], want[0], f"L_G, {what}", mistakes=mistakes)
    for key in ("loss_sem", "loss_nat"):
        if key not in got[1]:
            pytest.fail(f"{what}: stats has no {key!r} (the term before lambda weighs it)",
                        pytrace=False)
        check_close(got[1][key], want[1][key], f"stats[{key!r}], {what}")


def test_generator_loss_worked_example(student):
    f = student("generator_loss")
    logp = torch.tensor([[[-1.0, -1.0], [-2.0, -2.0]]])  # (1, 2, 2): mean log-probs (-1, -2)
    mask = torch.ones(1, 2, 2)
    r_sem, r_nat = torch.tensor([[60.0, 40.0, 50.0]]), torch.tensor([[1.0, 3.0, 2.0]])
    args = (logp, mask, r_sem, r_nat, 0.25)
    # Greedy: advantages (10, -10) -> L_sem = -5; (-1, 1) -> L_nat = 0.5; 0.25*-5 + 0.75*0.5.
    _check_generator(f(*args, "greedy"), (-0.875, {"loss_sem": -5.0, "loss_nat": 0.5}),
                     "samples (60, 40) greedy 50 and (1, 3) greedy 2, lam = 0.25",
                     _generator_mistakes(*args, "greedy"))
    # Leave-one-out: baselines (40, 60) and (3, 1) -> L_sem = -10, L_nat = 1.
    _check_generator(f(*args, "loo"), (-1.75, {"loss_sem": -10.0, "loss_nat": 1.0}),
                     "the same with baseline 'loo'", _generator_mistakes(*args, "loo"))


def test_generator_loss_random_values_and_gradients(student, reference):
    f = student("generator_loss")
    g = seeded(16)
    B, K, T = 3, 4, 5
    logp, mask = padded_log_probs(g, B, K, T)
    r_sem, r_nat = 60 + 20 * torch.rand(B, K + 1, generator=g), torch.randn(B, K + 1, generator=g)
    for lam in (0.0, 0.3, 1.0):
        for baseline in ("greedy", "loo"):
            args = (logp, mask, r_sem, r_nat, lam, baseline)
            what = f"random (B={B}, K={K}, T={T}), lam = {lam}, baseline {baseline!r}"
            got, (got_grad, *r_grads) = f.grad(*args, wrt=(0, 2, 3))
            want, (want_grad, *_) = reference.generator_loss.grad(*args, wrt=(0, 2, 3))
            _check_generator(got, want, what, _generator_mistakes(*args))
            check_close(got_grad, want_grad, f"d L_G / d logp, {what}")
            if any(r.abs().max() > 0 for r in r_grads):
                pytest.fail("L_G sends gradient into the rewards: the advantages are constant "
                            "weights (detach them)", pytrace=False)
