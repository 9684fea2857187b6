"""Solution file for the cgtgan classroom exercises (docs/exercises.md).

Copy this file, fill in the body of the function you are working on, and grade it:

    CGTGAN_STUDENT=my_solution.py python -m pytest tests/exercises -k NAME
    python classroom.py check my_solution.py      # every exercise, one line each

A function left as `raise NotImplementedError` simply fails its own tests. Import what you use
(torch, torch.nn.functional, math, the project's helpers such as evaluate.ngrams). The grader
rejects a file that imports the project's version of a graded function (or the helper that
computes it) or reaches into the grader (inspect, pytest, sys._getframe, exec). Shape legend:
B images, K samples per image, T tokens, D CLIP width, M corpus sentences, N sequences,
V vocabulary.
"""
import math

import torch
import torch.nn.functional as F


# exercise: clip_cos_reward
def clip_cos_reward(image: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
    """r_cos = 100 * cos(v, c). image (B, D), caption (B, K, D) -> (B, K)."""
    raise NotImplementedError("exercise clip_cos_reward: see docs/exercises.md")


# exercise: clip_agg_target
def clip_agg_target(image: torch.Tensor, corpus: torch.Tensor, t: float) -> torch.Tensor:
    """a = sum_j softmax_j(t * cos(v, s_j)) * s_j, s_j the L2-normalised corpus rows.
    image (B, D), corpus (M, D) -> (B, D). Must stay finite at t = 1000."""
    raise NotImplementedError("exercise clip_agg_target: see docs/exercises.md")


# exercise: clip_agg_reward
def clip_agg_reward(target: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
    """r_agg = 0.5 * 100 * cos(a, c) + 0.5 * 100 * (1 - mean_d |a_d - c_d|), a and c L2-normalised.
    target (B, D), caption (B, K, D) -> (B, K)."""
    raise NotImplementedError("exercise clip_agg_reward: see docs/exercises.md")


# exercise: scst_loss
def scst_loss(logp: torch.Tensor, mask: torch.Tensor, reward: torch.Tensor,
              baseline: torch.Tensor | None = None) -> torch.Tensor:
    """-mean_{b,k} (r_bk - b_bk) * (mean over the caption's tokens of log p).
    logp, mask (B, K, T); reward (B, K); baseline (B,) greedy rewards, or None for the mean of the
    other K - 1 samples -> scalar."""
    raise NotImplementedError("exercise scst_loss: see docs/exercises.md")


# exercise: discriminator_loss
def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor):
    """0.5 * (BCE(real, 1) + BCE(fake, 0)), each a mean. real (N,), fake (N',) ->
    (loss, {"d_loss": float, "d_acc": float}); d_acc = mean of the real and fake accuracies."""
    raise NotImplementedError("exercise discriminator_loss: see docs/exercises.md")


# exercise: lambda_schedule
def lambda_schedule(step: int, hold: int, ramp: int, final: float = 0.5) -> float:
    """0 while step < hold, then final * min(1, (step - hold) / ramp); final when ramp <= 0."""
    raise NotImplementedError("exercise lambda_schedule: see docs/exercises.md")


# exercise: caption_loss
def caption_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose label is not -1. logits (N, T, V), labels (N, T):
    labels[n, t] is the token logits[n, t] should predict (already shifted by one; no shift here)."""
    raise NotImplementedError("exercise caption_loss: see docs/exercises.md")


# exercise: contrastive_loss
def contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """CLIP's loss: (CE(L, arange(B)) + CE(L^T, arange(B))) / 2. L (B, B) -> scalar."""
    raise NotImplementedError("exercise contrastive_loss: see docs/exercises.md")


# exercise: tfidf_vector
def tfidf_vector(counts: list, df: dict, n_images: int) -> list:
    """CIDEr-D's tf-idf of one caption. counts: [{n-gram tuple: count}] for n = 1..4;
    df: {n-gram: number of images whose references contain it} ->
    [{n-gram: count * (log(n_images) - log(max(1, df(n-gram))))}] for n = 1..4."""
    raise NotImplementedError("exercise tfidf_vector: see docs/exercises.md")


# exercise: bpe
def bpe(word: str, ranks: dict) -> list:
    """CLIP's BPE merge loop. word: a string of symbols (one character each); the last symbol
    gets "</w>". Repeatedly merge every occurrence (left to right) of the adjacent pair with the
    lowest rank in ranks {(a, b): rank}, until no adjacent pair is in ranks -> list of symbols."""
    raise NotImplementedError("exercise bpe: see docs/exercises.md")


# exercise: prefix_lm_logits
def prefix_lm_logits(gpt, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher forcing through a visual prefix. gpt: a GPT2LMHeadModel; prefix (N, P, E);
    tokens (N, T) -> logits (N, T, V), where logits[:, i] predicts tokens[:, i] from the prefix
    and tokens[:, :i] alone (GPT-2's output at a position predicts the next position's token)."""
    raise NotImplementedError("exercise prefix_lm_logits: see docs/exercises.md")


# exercise: caption_log_prob
def caption_log_prob(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each caption's mean token log-prob over its real tokens. logp, mask (..., T) -> (...);
    mask is 1 on real tokens (up to and including the end token), 0 on padding."""
    raise NotImplementedError("exercise caption_log_prob: see docs/exercises.md")


# exercise: generator_loss
def generator_loss(logp: torch.Tensor, mask: torch.Tensor, r_sem: torch.Tensor,
                   r_nat: torch.Tensor, lam: float, baseline: str = "greedy"):
    """L_G = lam * L_sem + (1 - lam) * L_nat, each a self-critical loss with its own baseline.
    logp, mask (B, K, T); r_sem, r_nat (B, K+1): K samples' rewards, then the greedy caption's;
    baseline "greedy" (column K of the same reward) or "loo" -> (L_G, {"loss_sem", "loss_nat"})."""
    raise NotImplementedError("exercise generator_loss: see docs/exercises.md")
