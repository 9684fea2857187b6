"""The exercise grader's setup: the student's functions (in their own process) and the reference.

`CGTGAN_STUDENT=path/to/student.py python -m pytest tests/exercises -k NAME` grades the function
NAME of the student's file; `python classroom.py check FILE` runs the same tests and prints one line
per exercise. The grader grades only a student: without CGTGAN_STUDENT it refuses in one line
(and the default `python -m pytest`, which does not name tests/exercises, skips it;
tests/test_exercises_grader.py grades docs/exercises_solutions.py there instead).

The student's file is checked (classroom.violations) and imported by a worker process
(classroom.Worker); each call sends the inputs and gets back the result and the gradients, so
nothing the student writes runs in this process. The reference is the project's own function,
called here, or in a student release (classroom.py release), whose functions are stubs, its
results recorded on these very inputs (tests/exercises/expected.pt).
"""
from __future__ import annotations

import hashlib
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import classroom  # noqa: E402  (after the path is set)

HERE = Path(__file__).resolve().parent
STUDENT = os.environ.get(classroom.STUDENT_ENV, "").strip()
RECORD = os.environ.get("CGTGAN_RECORD", "").strip()
EXPECTED = ROOT / classroom.EXPECTED
REFERENCES = {name: where for name, (_, where) in classroom.EXERCISES.items()}
REFERENCES["cider_d"] = "evaluate.cider_d"  # the grader scores tf-idf vectors against it

# Known mistakes that make the student's code raise: (words in "Type: message", what to do).
HINTS = {
    "caption_loss": [("out of bounds", "labels -1 mark padding: pass ignore_index=-1 "
                      "(cgtgan.IGNORE_INDEX) to cross_entropy; its default (-100) reads -1 as a "
                      "class index")],
    "scst_loss": [("GradientError", "detach only the advantage (r - b): the log-probabilities "
                   "must keep their gradient, it is what the loss trains")],
    "bpe": [("timeout", "does the loop stop once no adjacent pair is in ranks?")],
    "prefix_lm_logits": [("Sizes of tensors must match", "concatenate along the sequence (dim 1):"
                          " the prefix (N, P, E), then the token embeddings gpt.transformer.wte("
                          "tokens) (N, T, E)"),
                         ("GradientError", "keep the gradient: the mapping network and GPT-2 "
                          "learn through these logits (no torch.no_grad, no detach)")],
    "caption_log_prob": [("GradientError", "keep the gradient: the policy gradient flows through "
                          "these log-probs (no detach)")],
    "generator_loss": [("GradientError", "detach only the advantages (inside scst_loss): the "
                        "log-probabilities must keep their gradient")],
}


# ----------------------------------------------------------------------------------------------
# No student, no grading


def pytest_configure(config):
    if not STUDENT and any(_inside_here(arg, config) for arg in config.args):
        raise pytest.UsageError(classroom.no_student_message())


def pytest_collection_modifyitems(config, items):
    mine = [item for item in items if HERE in Path(str(item.path)).resolve().parents]
    if STUDENT or not mine:
        return
    skip = pytest.mark.skip(reason=f"grades a student file: set {classroom.STUDENT_ENV}")
    for item in mine:
        item.add_marker(skip)


def _inside_here(arg: str, config) -> bool:
    path = (Path(config.invocation_params.dir) / arg.split("::")[0]).resolve()
    return path == HERE or HERE in path.parents


def pytest_report_header(config):
    return f"cgtgan exercises: grading {STUDENT or '(no student file)'}"


# ----------------------------------------------------------------------------------------------
# The two sides: Graded(name, run) is called like the function, or .grad(*args, wrt=(i, ...))


class Graded:
    """A graded function: `f(*args)` -> result; `f.grad(*args, wrt=(0,))` -> (result, [d result /
    d args[i] for i in wrt]) (the loss is the result's first element when it is a tuple)."""

    def __init__(self, name: str, run):
        self.name, self.run = name, run

    def __call__(self, *args):
        return self.run(self.name, args, ())[0]

    def grad(self, *args, wrt=(0,)):
        return self.run(self.name, args, tuple(wrt))


@pytest.fixture(scope="session")
def worker():
    """The student's worker process and how it started: ("ready", names) or why not."""
    if not STUDENT:
        pytest.fail(classroom.no_student_message(), pytrace=False)
    if not Path(STUDENT).is_file():
        pytest.fail(f"{classroom.STUDENT_ENV}={STUDENT}: no such file; give the path of your "
                    "solution file (see docs/exercises_student_template.py)", pytrace=False)
    status = _WORKER.start()
    yield _WORKER, status
    _WORKER.close()


# The worker starts importing torch now, while pytest collects the tests.
_WORKER = classroom.Worker(STUDENT)
if STUDENT and Path(STUDENT).is_file():
    _WORKER.spawn()
torch.set_num_threads(1)  # the reference's tiny tensors, as in the worker


@pytest.fixture
def student(worker):
    """student(NAME) -> the student's NAME, run in the worker process."""
    proc, status = worker
    if status[0] == "rejected":
        pytest.fail("rejected: " + "; ".join(status[1]), pytrace=False)
    if status[0] == "broken":
        line = f" (line {status[2]})" if status[2] else ""
        pytest.fail(f"{STUDENT} failed to import: {status[1]}{line}", pytrace=False)
    if status[0] != "ready":
        pytest.fail(f"the grader's worker did not start: {status}", pytrace=False)

    def get(name: str) -> Graded:
        if name not in status[1]:
            pytest.fail(f"{STUDENT} defines no function {name}(); write it there (see "
                        "docs/exercises.md)", pytrace=False)
        return Graded(name, lambda n, args, wrt: _answer(n, proc.request(n, args, wrt)))

    return get


def _answer(name: str, reply):
    """The worker's reply as (result, grads), or the test fails with what went wrong."""
    if reply[0] == "ok":
        return reply[1], reply[2]
    if reply[0] == "timeout":
        kind, text = "timeout", f"{name}() did not return within {classroom.TIMEOUT:.0f} s"
    elif reply[1] == "NotImplementedError":
        pytest.fail(f"{name}() is not written yet (it raises NotImplementedError)", pytrace=False)
    elif reply[1] == "GradientError":
        kind, text = "GradientError", f"{name}(): {reply[2]}"
    else:
        line = f" (your file, line {reply[3]})" if reply[3] else ""
        kind, text = f"{reply[1]}: {reply[2]}", f"{name}() raised {reply[1]}: {reply[2]}{line}"
    hints = [hint for words, hint in HINTS.get(name, []) if words in kind]
    pytest.fail(text.splitlines()[0] + (f": {hints[0]}" if hints else ""), pytrace=False)


# ----------------------------------------------------------------------------------------------
# The reference: live (the project's functions), or replayed in a release


def _digest(x, h) -> None:
    if isinstance(x, torch.nn.Module):  # a model given to the function: its class and weights
        h.update(f"M{type(x).__name__}\0".encode())
        _digest(dict(x.state_dict()), h)
    elif isinstance(x, torch.Tensor):
        h.update(f"T{x.dtype}{tuple(x.shape)}\0".encode())
        h.update(x.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(x, dict):
        h.update(f"D{len(x)}\0".encode())
        for k in sorted(x, key=repr):
            _digest(k, h)
            _digest(x[k], h)
    elif isinstance(x, (list, tuple)):
        h.update(f"L{len(x)}\0".encode())
        for v in x:
            _digest(v, h)
    else:  # typed and terminated, so (1, 10) and (11, 0) differ
        h.update(f"{type(x).__name__}:{x!r}\0".encode())


def key_of(name: str, args: tuple, wrt: tuple) -> str:
    h = hashlib.sha256(name.encode())
    _digest((args, wrt), h)
    return h.hexdigest()


RECORDED: dict = {}
REPLAY = torch.load(EXPECTED, weights_only=False) if EXPECTED.is_file() else None


def _reference(name: str, args: tuple, wrt: tuple):
    key = key_of(name, args, wrt)
    if REPLAY is not None:
        if key not in REPLAY:
            pytest.fail(f"the release has no recorded reference for this call of {name} (were "
                        "the grader's inputs changed?)", pytrace=False)
        return REPLAY[key]
    module, attr = REFERENCES[name].split(".")
    result = classroom.call(getattr(importlib.import_module(module), attr), args, wrt)
    if RECORD:
        RECORDED[key] = result
    return result


def pytest_sessionfinish(session, exitstatus):
    if RECORD and RECORDED:
        Path(RECORD).parent.mkdir(parents=True, exist_ok=True)
        torch.save(RECORDED, RECORD)


class _References:
    def __getattr__(self, name: str) -> Graded:
        if name not in REFERENCES:
            raise AttributeError(name)
        return Graded(name, _reference)


@pytest.fixture
def reference():
    return _References()
