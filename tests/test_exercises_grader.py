"""The exercise grader (tests/exercises) passes the reference and fails deliberately wrong code.

A student file is written to tmp_path with the common mistakes each exercise is meant to catch,
and pytest runs the grader on it in a subprocess with CGTGAN_STUDENT set; the JUnit XML report
says which tests passed and failed, and with what message.
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
             "tfidf_vector", "bpe")

# Correct: imported from the project. Wrong: a classic mistake per function. Missing:
# contrastive_loss (the grader must say so, not crash).
STUDENT = '''
import math
import torch
import torch.nn.functional as F
from cgtgan import clip_cos_reward, clip_agg_reward, discriminator_loss


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
'''
WRONG = {"clip_agg_target", "scst_loss", "lambda_schedule", "caption_loss", "tfidf_vector", "bpe"}
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


def test_grader_names_a_missing_or_broken_student_file(tmp_path, monkeypatch):
    import importlib.util

    broken = tmp_path / "broken.py"
    broken.write_text("def bpe(word, ranks):\n    return [\n")
    for path, words in ((tmp_path / "nope.py", "no such file"), (broken, "failed to import")):
        monkeypatch.setenv("CGTGAN_STUDENT", str(path))
        spec = importlib.util.spec_from_file_location("grader_conftest",
                                                      ROOT / "tests/exercises/conftest.py")
        conftest = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(conftest)
        assert isinstance(conftest._STUDENT, Exception) and words in str(conftest._STUDENT)
