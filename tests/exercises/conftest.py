"""The exercise grader's setup: whose functions are graded, and the reference they are held to.

`CGTGAN_STUDENT=path/to/student.py python -m pytest tests/exercises -k NAME` grades the function
NAME of the student's file (imported by path; it may import anything from the project). With
CGTGAN_STUDENT unset, the reference implementation grades itself, so the default test run checks
that the grader's fixed examples agree with the project's code. docs/exercises.md lists the
exercises; each test below is named `test_<function>_<what it checks>`.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cgtgan  # noqa: E402  (after the path is set)
import clip_model  # noqa: E402
import clip_tokenizer  # noqa: E402
import evaluate  # noqa: E402

STUDENT_ENV = "CGTGAN_STUDENT"


# ----------------------------------------------------------------------------------------------
# The reference: the project's own functions (adapted to the exercise signature where the project
# computes the quantity inside a larger function).


REFERENCE = SimpleNamespace(
    clip_cos_reward=cgtgan.clip_cos_reward,
    clip_agg_target=cgtgan.clip_agg_target,
    clip_agg_reward=cgtgan.clip_agg_reward,
    scst_loss=cgtgan.scst_loss,
    discriminator_loss=cgtgan.discriminator_loss,
    lambda_schedule=cgtgan.lambda_schedule,
    caption_loss=cgtgan.caption_loss,
    contrastive_loss=clip_model.contrastive_loss,
    tfidf_vector=evaluate.tfidf_vector,
    bpe=clip_tokenizer.bpe,
)


# ----------------------------------------------------------------------------------------------
# The student's file


def _load_student():
    """(module or None, description). A bad path is reported once per test, in one line."""
    path = os.environ.get(STUDENT_ENV, "").strip()
    if not path:
        return None, "the reference implementation (CGTGAN_STUDENT is unset)"
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        return FileNotFoundError(f"{STUDENT_ENV}={path}: no such file; give the path of your "
                                 "solution file (see docs/exercises_student_template.py)"), path
    spec = importlib.util.spec_from_file_location("cgtgan_student", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the student's code may fail in any way; report it, do not crash
        return RuntimeError(f"{file} failed to import: {type(err).__name__}: {err}"), str(file)
    return module, str(file)


_STUDENT, _WHO = _load_student()


def pytest_report_header(config):
    return f"cgtgan exercises: grading {_WHO}"


@pytest.fixture
def student():
    """student(NAME) -> the function to grade: the student's NAME, or the reference's."""

    def get(name: str):
        if _STUDENT is None:
            return getattr(REFERENCE, name)
        if isinstance(_STUDENT, Exception):
            pytest.fail(str(_STUDENT), pytrace=False)
        fn = getattr(_STUDENT, name, None)
        if not callable(fn):
            pytest.fail(f"{_WHO} defines no function {name}(); write it there (see "
                        f"docs/exercises.md)", pytrace=False)
        return fn

    return get


@pytest.fixture
def reference():
    return REFERENCE
