"""The exercise grader (tests/exercises) passes the solutions and fails deliberately wrong code.

A student file is written to tmp_path with the common mistakes each exercise is meant to catch,
and pytest runs the grader on it in a subprocess with CGTGAN_STUDENT set; the JUnit XML report
says which tests passed and failed, and with what message. Without a student file the grader
refuses in one line; `python classroom.py check` prints one line per exercise.
"""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXERCISES = ("clip_cos_reward", "clip_agg_target", "clip_agg_reward", "scst_loss",
             "discriminator_loss", "lambda_schedule", "caption_loss", "contrastive_loss",
             "tfidf_vector", "bpe", "prefix_lm_logits", "caption_log_prob", "generator_loss")

# Correct: the solutions file's functions. Wrong: a classic mistake per function, defined after
# them (a later def replaces an earlier one). Missing: contrastive_loss (the grader must say so).
STUDENT = (ROOT / "docs/exercises_solutions.py").read_text() + '''

def clip_agg_target(image, corpus, t):
    """Wrong: a softmax without subtracting the maximum overflows at large t."""
    v, s = F.normalize(image, dim=-1), F.normalize(corpus, dim=-1)
    w = torch.exp(t * v @ s.T)
    return (w / w.sum(1, keepdim=True)) @ s


def scst_loss(logp, mask, reward, baseline=None):
    """Wrong: sums log-probs over tokens instead of averaging them."""
    k = reward.shape[1]
    b = baseline[:, None] if baseline is not None else (reward.sum(1, keepdim=True) - reward) / (k - 1)
    return -((reward - b).detach() * (logp * mask).sum(-1)).mean()


def lambda_schedule(step, hold, ramp, final=0.5):
    """Wrong: forgets the hold (ramps from step 0)."""
    return final * min(1.0, step / ramp) if ramp > 0 else final


def caption_loss(logits, labels):
    """Wrong, as the official code: pads with 0 and ignores 0, which is also GPT-2's "!"."""
    return F.cross_entropy(logits.flatten(0, 1), labels.clamp_min(0).flatten(), ignore_index=0)


def tfidf_vector(counts, df, n_images):
    """Wrong: term frequency normalised by the caption length."""
    out = []
    for ck in counts:
        total = sum(ck.values()) or 1
        idf = {g: math.log(n_images) - math.log(max(1, df.get(g, 0))) for g in ck}
        out.append({g: c / total * idf[g] for g, c in ck.items()})
    return out


def bpe(word, ranks):
    """Wrong: merges the leftmost known pair instead of the lowest-ranked one."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while True:
        for i in range(len(parts) - 1):
            if (parts[i], parts[i + 1]) in ranks:
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
                break
        else:
            return parts


del contrastive_loss
'''
# generator_loss is the solutions', built on this file's wrong scst_loss: wrong with it.
WRONG = {"clip_agg_target", "scst_loss", "lambda_schedule", "caption_loss", "tfidf_vector", "bpe",
         "generator_loss"}
MISSING = {"contrastive_loss"}


def run_grader(student: str, report: Path, *args: str) -> dict[str, tuple[str, str]]:
    """{test name: (outcome, message)} of `pytest tests/exercises` grading `student`."""
    env = {**os.environ, "CGTGAN_STUDENT": student}
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/exercises", "-q", "-p",
                           "no:cacheprovider", f"--junitxml={report}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert report.is_file(), proc.stdout + proc.stderr
    out = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        out[case.get("name")] = ("failed", bad.get("message", "")) if bad is not None else ("passed", "")
    return out


def exercise_of(test_name: str) -> str:
    return next(e for e in EXERCISES if test_name.startswith(f"test_{e}_"))


def test_grader_fails_wrong_functions_and_passes_right_ones(tmp_path):
    student = tmp_path / "student.py"
    student.write_text(STUDENT)
    results = run_grader(str(student), tmp_path / "report.xml")
    assert {exercise_of(name) for name in results} == set(EXERCISES)
    for name, (outcome, message) in results.items():
        exercise = exercise_of(name)
        if exercise in MISSING:
            assert outcome == "failed" and "defines no function contrastive_loss" in message, name
        elif exercise not in WRONG:
            assert outcome == "passed", f"{name} failed on a correct function: {message}"
    for exercise in WRONG:
        failed = [n for n, (o, _) in results.items() if exercise_of(n) == exercise and o == "failed"]
        assert failed, f"the grader passed the wrong {exercise}"
    # The messages say what is wrong.
    assert "overflow" in results["test_clip_agg_target_stable_at_high_temperature"][1]
    assert "lowest-ranked" in results["test_bpe_worked_example"][1]
    assert "lambda at step 50" in results["test_lambda_schedule_worked_example"][1]
    assert "GPT-2's '!'" in results["test_caption_loss_worked_example"][1]


# The mistakes the grader explains in words (docs/exercises.md's teaching messages).
TEACHING = (ROOT / "docs/exercises_solutions.py").read_text() + '''

def clip_agg_target(image, corpus, t):
    """Wrong: normalises the corpus along dim 0 (each column, not each sentence)."""
    v, s = F.normalize(image, dim=-1), F.normalize(corpus, dim=0)
    return (t * v @ s.T).softmax(-1) @ s


def scst_loss(logp, mask, reward, baseline=None):
    """Wrong: detaches everything, the log-probabilities too."""
    b = baseline[:, None] if baseline is not None else reward.mean(1, keepdim=True)
    return -((reward - b) * ((logp * mask).sum(-1) / mask.sum(-1))).mean().detach()


def caption_loss(logits, labels):
    """Wrong: cross_entropy's default ignore_index (-100) reads the padding -1 as a class."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def bpe(word, ranks):
    """Wrong: merges only the first occurrence of the chosen pair per round."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = list(zip(parts, parts[1:]))
        best = min(pairs, key=lambda pair: ranks.get(pair, math.inf))
        if best not in ranks:
            break
        i = pairs.index(best)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def prefix_lm_logits(gpt, prefix, tokens):
    """Wrong: reads one position late (the output after each token, which has seen it)."""
    embeds = torch.cat([prefix, gpt.transformer.wte(tokens)], dim=1)
    return gpt(inputs_embeds=embeds).logits[:, prefix.shape[1]:]


def caption_log_prob(logp, mask):
    """Wrong: divides by T, so the padding counts in the mean."""
    return (logp * mask).sum(-1) / logp.shape[-1]


def generator_loss(logp, mask, r_sem, r_nat, lam, baseline="greedy"):
    """Wrong: one baseline, the semantic greedy reward, for both terms (with a right self-critical
    loss: this file's scst_loss above is wrong on purpose)."""
    def scst(r, b):
        b = (r.sum(1, keepdim=True) - r) / (r.shape[1] - 1) if b is None else b[:, None]
        return -((r - b).detach() * (logp * mask).sum(-1) / mask.sum(-1)).mean()

    k = logp.shape[1]
    base = None if baseline == "loo" else r_sem[:, k]
    loss_sem, loss_nat = scst(r_sem[:, :k], base), scst(r_nat[:, :k], base)
    return lam * loss_sem + (1 - lam) * loss_nat, {"loss_sem": loss_sem.item(),
                                                   "loss_nat": loss_nat.item()}
'''

# More mistakes of the three step-level exercises, each graded on its own.
MORE_MISTAKES = {
    "prefix_lm_logits": ("""
def prefix_lm_logits(gpt, prefix, tokens):
    embeds = torch.cat([prefix, gpt.transformer.wte(tokens)], dim=1)
    return gpt(inputs_embeds=embeds).logits
""", "the prefix positions carry no labels"),
    "caption_log_prob": ("""
def caption_log_prob(logp, mask):
    return logp.mean(-1)
""", "padding entered the mean"),
    "generator_loss": ("""
def generator_loss(logp, mask, r_sem, r_nat, lam, baseline="greedy"):
    k = logp.shape[1]
    loo = baseline == "loo"
    loss_sem = scst_loss(logp, mask, r_sem[:, :k], None if loo else r_sem[:, k])
    loss_nat = scst_loss(logp, mask, r_nat[:, :k], None if loo else r_nat[:, k])
    return (1 - lam) * loss_sem + lam * loss_nat, {"loss_sem": loss_sem.item(),
                                                   "loss_nat": loss_nat.item()}
""", "lambda weighs the semantic term"),
}


def test_grader_explains_the_known_mistakes(tmp_path):
    student = tmp_path / "student.py"
    student.write_text(TEACHING)
    results = run_grader(str(student), tmp_path / "report.xml", "-k",
                         "clip_agg_target or scst_loss or caption_loss or bpe or "
                         "prefix_lm_logits or caption_log_prob or generator_loss")
    messages = {exercise_of(n): m for n, (o, m) in results.items() if o == "failed"}
    assert "along dim 0" in results["test_clip_agg_target_worked_example"][1]
    assert "along dim 0" in results["test_clip_agg_target_random"][1]
    assert "along dim 0" in results["test_clip_agg_target_stable_at_high_temperature"][1]
    assert "detach only the advantage" in messages["scst_loss"]
    assert "ignore_index=-1" in results["test_caption_loss_worked_example"][1]
    assert "Traceback" not in messages["caption_loss"]
    assert "only its first occurrence" in results["test_bpe_worked_example"][1]
    assert "one position late" in results["test_prefix_lm_logits_worked_example"][1]
    assert "one position late" in results["test_prefix_lm_logits_random_values_and_gradients"][1]
    assert "divided by T" in results["test_caption_log_prob_worked_example"][1]
    assert "padding" in results["test_caption_log_prob_random_values_and_gradients"][1]
    assert "its own baseline" in results["test_generator_loss_worked_example"][1]
    assert "its own baseline" in results["test_generator_loss_random_values_and_gradients"][1]


def test_grader_explains_more_step_mistakes(tmp_path):
    solutions = (ROOT / "docs/exercises_solutions.py").read_text()
    for name, (code, words) in MORE_MISTAKES.items():
        student = tmp_path / f"{name}.py"
        student.write_text(solutions + code)
        results = run_grader(str(student), tmp_path / f"{name}.xml", "-k", name)
        assert words in results[f"test_{name}_worked_example"][1], results


def test_grader_refuses_without_a_student_file(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CGTGAN_STUDENT"}
    env["CGTGAN_STUDNET"] = "my_solution.py"  # a typo the message points out
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/exercises", "-q", "-p",
                           "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1, lines
    assert "CGTGAN_STUDENT=" in lines[0] and "CGTGAN_STUDNET is set: a typo?" in lines[0]
    proc = subprocess.run([sys.executable, "classroom.py", "check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "CGTGAN_STUDENT" in proc.stderr


def test_check_prints_one_line_per_exercise_and_passes_the_solutions():
    proc = subprocess.run([sys.executable, "classroom.py", "check", "docs/exercises_solutions.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line.split()[:2] for line in lines[1:-1]] == [["PASS", name] for name in EXERCISES]
    assert lines[-1] == f"{len(EXERCISES)} of {len(EXERCISES)} exercises pass"
