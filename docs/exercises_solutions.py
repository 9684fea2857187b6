"""Solutions of the cgtgan classroom exercises (docs/exercises.md), for teachers, in one place.

Each function is the plain answer a student is expected to write: no chunking, no caching, the
equation as the exercise states it. The grader holds them to the project's reference
implementations (`python classroom.py check docs/exercises_solutions.py` passes every exercise,
and tests/test_exercises_grader.py checks it). `python classroom.py release OUT_DIR` replaces the
body under each `# exercise: NAME` line by `raise NotImplementedError`, which is also exactly
docs/exercises_student_template.py. Shape legend: B images, K samples per image, T tokens,
D CLIP width, M corpus sentences, N sequences, V vocabulary.
"""
import math

import torch
import torch.nn.functional as F


# exercise: clip_cos_reward
def clip_cos_reward(image: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
    """r_cos = 100 * cos(v, c). image (B, D), caption (B, K, D) -> (B, K)."""
    v = F.normalize(image, dim=-1)[:, None, :]  # (B, 1, D)
    c = F.normalize(caption, dim=-1)  # (B, K, D)
    return 100 * (v * c).sum(-1)


# exercise: clip_agg_target
def clip_agg_target(image: torch.Tensor, corpus: torch.Tensor, t: float) -> torch.Tensor:
    """a = sum_j softmax_j(t * cos(v, s_j)) * s_j, s_j the L2-normalised corpus rows.
    image (B, D), corpus (M, D) -> (B, D). Must stay finite at t = 1000."""
    v = F.normalize(image, dim=-1)  # (B, D)
    s = F.normalize(corpus, dim=-1)  # (M, D): one sentence per row
    logits = t * v @ s.T  # (B, M)
    weights = torch.exp(logits - logits.max(dim=1, keepdim=True).values)  # largest term exp(0) = 1
    return (weights / weights.sum(dim=1, keepdim=True)) @ s


# exercise: clip_agg_reward
def clip_agg_reward(target: torch.Tensor, caption: torch.Tensor) -> torch.Tensor:
    """r_agg = 0.5 * 100 * cos(a, c) + 0.5 * 100 * (1 - mean_d |a_d - c_d|), a and c L2-normalised.
    target (B, D), caption (B, K, D) -> (B, K)."""
    a = F.normalize(target, dim=-1)[:, None, :]  # (B, 1, D)
    c = F.normalize(caption, dim=-1)  # (B, K, D)
    return 50 * (a * c).sum(-1) + 50 * (1 - (a - c).abs().mean(-1))


# exercise: scst_loss
def scst_loss(logp: torch.Tensor, mask: torch.Tensor, reward: torch.Tensor,
              baseline: torch.Tensor | None = None) -> torch.Tensor:
    """-mean_{b,k} (r_bk - b_bk) * (mean over the caption's tokens of log p).
    logp, mask (B, K, T); reward (B, K); baseline (B,) greedy rewards, or None for the mean of the
    other K - 1 samples -> scalar."""
    if baseline is None:
        others = (reward.sum(dim=1, keepdim=True) - reward) / (reward.shape[1] - 1)  # (B, K)
    else:
        others = baseline[:, None]  # (B, 1)
    advantage = (reward - others).detach()  # a constant weight per caption
    mean_logp = (logp * mask).sum(-1) / mask.sum(-1)  # (B, K)
    return -(advantage * mean_logp).mean()


# exercise: discriminator_loss
def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor):
    """0.5 * (BCE(real, 1) + BCE(fake, 0)), each a mean. real (N,), fake (N',) ->
    (loss, {"d_loss": float, "d_acc": float}); d_acc = mean of the real and fake accuracies."""
    # -log sigmoid(x) = softplus(-x) and -log(1 - sigmoid(x)) = softplus(x), both without overflow.
    loss = 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())
    acc = 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())
    return loss, {"d_loss": loss.item(), "d_acc": acc.item()}


# exercise: lambda_schedule
def lambda_schedule(step: int, hold: int, ramp: int, final: float = 0.5) -> float:
    """0 while step < hold, then final * min(1, (step - hold) / ramp); final when ramp <= 0."""
    if step < hold:
        return 0.0
    if ramp <= 0:
        return final
    return final * min(1.0, (step - hold) / ramp)


# exercise: caption_loss
def caption_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose label is not -1. logits (N, T, V), labels (N, T):
    labels[n, t] is the token logits[n, t] should predict (already shifted by one; no shift here)."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-1)


# exercise: contrastive_loss
def contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """CLIP's loss: (CE(L, arange(B)) + CE(L^T, arange(B))) / 2. L (B, B) -> scalar."""
    target = torch.arange(logits_per_image.shape[0])  # (B,): each row's own caption
    return (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.T, target)) / 2


# exercise: tfidf_vector
def tfidf_vector(counts: list, df: dict, n_images: int) -> list:
    """CIDEr-D's tf-idf of one caption. counts: [{n-gram tuple: count}] for n = 1..4;
    df: {n-gram: number of images whose references contain it} ->
    [{n-gram: count * (log(n_images) - log(max(1, df(n-gram))))}] for n = 1..4."""
    return [{gram: count * (math.log(n_images) - math.log(max(1, df.get(gram, 0))))
             for gram, count in order.items()} for order in counts]


# exercise: bpe
def bpe(word: str, ranks: dict) -> list:
    """CLIP's BPE merge loop. word: a string of symbols (one character each); the last symbol
    gets "</w>". Repeatedly merge every occurrence (left to right) of the adjacent pair with the
    lowest rank in ranks {(a, b): rank}, until no adjacent pair is in ranks -> list of symbols."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        best = min(zip(parts, parts[1:]), key=lambda pair: ranks.get(pair, math.inf))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):  # every occurrence, left to right, without overlap
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


# exercise: prefix_lm_logits
def prefix_lm_logits(gpt, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher forcing through a visual prefix. gpt: a GPT2LMHeadModel; prefix (N, P, E);
    tokens (N, T) -> logits (N, T, V), where logits[:, i] predicts tokens[:, i] from the prefix
    and tokens[:, :i] alone (GPT-2's output at a position predicts the next position's token)."""
    embeds = torch.cat([prefix, gpt.transformer.wte(tokens)], dim=1)  # (N, P+T, E)
    logits = gpt(inputs_embeds=embeds).logits  # (N, P+T, V)
    p = prefix.shape[1]
    return logits[:, p - 1:p - 1 + tokens.shape[1]]  # the outputs after p_{P-1}, w_0, ..., w_{T-2}


# exercise: caption_log_prob
def caption_log_prob(logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each caption's mean token log-prob over its real tokens. logp, mask (..., T) -> (...);
    mask is 1 on real tokens (up to and including the end token), 0 on padding."""
    return (logp * mask).sum(-1) / mask.sum(-1)


# exercise: generator_loss
def generator_loss(logp: torch.Tensor, mask: torch.Tensor, r_sem: torch.Tensor,
                   r_nat: torch.Tensor, lam: float, baseline: str = "greedy"):
    """L_G = lam * L_sem + (1 - lam) * L_nat, each a self-critical loss with its own baseline.
    logp, mask (B, K, T); r_sem, r_nat (B, K+1): K samples' rewards, then the greedy caption's;
    baseline "greedy" (column K of the same reward) or "loo" -> (L_G, {"loss_sem", "loss_nat"})."""
    k = logp.shape[1]
    sem_base = None if baseline == "loo" else r_sem[:, k]  # (B,)
    nat_base = None if baseline == "loo" else r_nat[:, k]  # (B,)
    loss_sem = scst_loss(logp, mask, r_sem[:, :k], sem_base)
    loss_nat = scst_loss(logp, mask, r_nat[:, :k], nat_base)
    loss = lam * loss_sem + (1 - lam) * loss_nat
    return loss, {"loss_sem": loss_sem.item(), "loss_nat": loss_nat.item()}
