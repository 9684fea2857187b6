"""The classroom kit (classroom.py): markers and stubs, the release, the static check of a
submission, the worker process, and grading a folder into a CSV."""
from __future__ import annotations

import ast
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import classroom

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("cgtgan.py", "clip_model.py", "evaluate.py", "clip_tokenizer.py")


# ----------------------------------------------------------------------------------------------
# Markers and stubs


def test_every_exercise_is_marked_once_in_the_project_and_in_the_solutions():
    marked = [name for f in PROJECT for name, _ in classroom.marked_functions((ROOT / f).read_text())]
    assert sorted(marked) == sorted(classroom.EXERCISES)
    for name, (_, where) in classroom.EXERCISES.items():
        module = where.split(".")[0]
        assert name in [n for n, _ in classroom.marked_functions((ROOT / f"{module}.py").read_text())]
    solutions = classroom.marked_functions(classroom.SOLUTIONS.read_text())
    assert [name for name, _ in solutions] == list(classroom.EXERCISES)


def test_stubs_keep_signature_and_docstring_and_nothing_else():
    for f in PROJECT:
        source = (ROOT / f).read_text()
        stubbed = classroom.stub_source(source)
        assert classroom.stub_source(stubbed) == stubbed  # a stub stays a stub
        before = {n.name: n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}
        for name, node in classroom.marked_functions(stubbed):
            old = before[node.name]
            assert ast.get_docstring(node) == ast.get_docstring(old)
            assert ast.dump(node.args) == ast.dump(old.args)
            assert [type(s).__name__ for s in node.body] == ["Expr", "Raise"], name
        # Everything unmarked is unchanged: the same functions, in the same order.
        after = [n.name for n in ast.parse(stubbed).body if isinstance(n, ast.FunctionDef)]
        assert after == [n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)]


# ----------------------------------------------------------------------------------------------
# The static check


@pytest.mark.parametrize("code, words", [
    ("from cgtgan import scst_loss", "imports the project's scst_loss"),
    ("from cgtgan import *", "imports the project's everything"),
    ("import cgtgan\nf = cgtgan.clip_agg_target", "uses the project's clip_agg_target"),
    ("import clip_tokenizer as t\nt.merge_pair", "uses the project's merge_pair"),
    ("import clip_tokenizer\nclip_tokenizer.Tokenizer().bpe('a')", "uses the project's bpe"),
    ("from evaluate import idf_by_df", "imports the project's idf_by_df"),
    ("import inspect", "reaches into the grader"),
    ("import pytest\npytest.fail = print", "reaches into the grader"),
    ("import sys\nframe = sys._getframe(1)", "reaches into the interpreter"),
    ("import sys\nsys.modules['x']", "reaches into the interpreter"),
    ("m = __import__('cgt' + 'gan')", "computed name"),
    ("import cgtgan\ngetattr(cgtgan, 'scst' + '_loss')", "computed or graded name"),
    ("import importlib", "reaches into the grader"),
])
def test_violations_name_the_line_and_what_is_wrong(code, words):
    found = classroom.violations(code)
    assert found and words in found[0] and found[0].startswith("line "), found


def test_violations_allow_the_helpers_a_student_needs():
    code = ("import math\nimport torch\nimport torch.nn.functional as F\nimport cgtgan\n"
            "from evaluate import ngrams\nPAD = cgtgan.IGNORE_INDEX\nx = getattr(F, 'relu')\n")
    assert classroom.violations(code) == []
    assert classroom.violations(classroom.SOLUTIONS.read_text()) == []
    assert classroom.violations(classroom.TEMPLATE.read_text()) == []


# ----------------------------------------------------------------------------------------------
# The worker process


def test_the_worker_runs_the_student_in_another_process(tmp_path):
    student = tmp_path / "student.py"
    student.write_text("import os\n\n\ndef lambda_schedule(step, hold, ramp, final=0.5):\n"
                       "    print('prints go to stderr, not into the replies')\n"
                       "    return float(os.getpid())\n\n\n"
                       "def bpe(word, ranks):\n    while True:\n        pass\n\n\n"
                       "def scst_loss(logp, mask, reward, baseline=None):\n"
                       "    return reward.sum() / 0 if baseline is None else undefined_name\n")
    worker = classroom.Worker(str(student), timeout=1.5)
    try:
        assert worker.start() == ("ready", ["bpe", "lambda_schedule", "scst_loss"])
        kind, pid, grads = worker.request("lambda_schedule", (0, 0, 0))
        assert kind == "ok" and pid != float(os.getpid()) and grads == []
        assert worker.request("bpe", ("ab", {})) == ("timeout",)
        # After a timeout the worker is started again for the next call.
        reply = worker.request("scst_loss", (None, None, None, 1.0))
        assert reply[:2] == ("error", "NameError") and reply[3] == 15, reply
    finally:
        worker.close()


def test_the_worker_refuses_a_rejected_file_before_running_it(tmp_path):
    student = tmp_path / "student.py"
    student.write_text("from cgtgan import bpe\nopen('ran', 'w').write('x')\n")
    worker = classroom.Worker(str(student))
    try:
        status = worker.start()
    finally:
        worker.close()
    assert status[0] == "rejected" and "line 1" in status[1][0] and "bpe" in status[1][0]
    assert not (ROOT / "ran").exists()


# ----------------------------------------------------------------------------------------------
# Grading a folder


def test_grade_writes_one_row_per_student_and_one_column_per_exercise(tmp_path):
    folder = tmp_path / "submissions"
    folder.mkdir()
    (folder / "ada.py").write_text(classroom.SOLUTIONS.read_text().replace(
        "def bpe(word: str, ranks: dict) -> list:", "def bpe_unused(word, ranks):"))
    (folder / "bob.py").write_text("from cgtgan import scst_loss\n")
    out = tmp_path / "grades.csv"
    proc = subprocess.run([sys.executable, "classroom.py", "grade", str(folder), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert [row["student"] for row in rows] == ["ada", "bob"]
    assert list(rows[0]) == ["student", *classroom.EXERCISES, "passed", "first_failure"]
    assert rows[0]["bpe"] == "fail" and rows[0]["passed"] == str(len(classroom.EXERCISES) - 1)
    assert all(rows[0][n] == "pass" for n in classroom.EXERCISES if n != "bpe")
    assert "defines no function bpe()" in rows[0]["first_failure"]
    assert rows[1]["passed"] == "0" and "rejected: line 1" in rows[1]["first_failure"]


# ----------------------------------------------------------------------------------------------
# The release, end to end


@pytest.mark.slow
def test_release_imports_fails_every_stub_and_passes_the_reference_bodies(tmp_path):
    out = tmp_path / "release"
    subprocess.run([sys.executable, "classroom.py", "release", str(out)], cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    assert (out / classroom.EXPECTED).is_file() and not (out / "tests/test_classroom.py").exists()
    for f in PROJECT + ("docs/exercises_solutions.py",):
        assert "NotImplementedError" in (out / f).read_text()
    assert (out / "docs/exercises_solutions.py").read_text().count("return") == 0
    subprocess.run([sys.executable, "-c", "import cgtgan, clip_model, evaluate, clip_tokenizer, "
                    "train, commands"], cwd=out, check=True, timeout=120)

    def check(student: Path) -> list[str]:
        proc = subprocess.run([sys.executable, "classroom.py", "check", str(student)], cwd=out,
                              capture_output=True, text=True, timeout=300)
        return proc.stdout.splitlines()[1:]

    stubs = check(out / "docs/exercises_student_template.py")
    n = len(classroom.EXERCISES)
    assert stubs[-1] == f"0 of {n} exercises pass" and all("not written yet" in s for s in stubs[:-1])
    answers = tmp_path / "answers.py"
    answers.write_text(classroom.SOLUTIONS.read_text())  # the reference bodies, put back
    assert check(answers)[-1] == f"{n} of {n} exercises pass"


# ----------------------------------------------------------------------------------------------
# A training run with the student's functions (python cgtgan.py train --student FILE)


@pytest.fixture
def restore_project():
    """Undoes classroom.swap_in: every project module's bindings as they were before the test."""
    import commands  # noqa: F401 (loads every module of a run, as swap_in does)

    modules = [m for m in list(sys.modules.values())
               if Path(getattr(m, "__file__", None) or "/").parent == ROOT]
    saved = [(m, dict(vars(m))) for m in modules]
    yield
    for module, names in saved:
        for key, value in names.items():
            if getattr(module, key, None) is not value:
                setattr(module, key, value)


def test_swap_in_puts_the_students_functions_into_the_run(tmp_path, restore_project, capsys):
    import train
    from test_cgtgan import tiny_config, tiny_world

    import cli
    import commands

    student = tmp_path / "mine.py"
    student.write_text(classroom.SOLUTIONS.read_text().replace(
        "    if step < hold:\n        return 0.0\n", "    return 1.0\n") + '''

def bpe(word, ranks):
    """Left as a stub."""
    raise NotImplementedError("exercise bpe: see docs/exercises.md")
''')
    swapped = cli.swap_student(str(student))
    line = capsys.readouterr().out
    assert "this run uses your clip_cos_reward" in line and "the project's: bpe" in line
    assert "bpe" not in swapped and train.generator_loss is swapped["generator_loss"]
    cfg = tiny_config(runs_dir=str(tmp_path / "runs"), name="mine")
    commands.run_train(cfg, tiny_world(tmp_path / "world"), table=False)
    records = [json.loads(x) for x in (tmp_path / "runs/mine/metrics.jsonl").read_text().splitlines()]
    # The student's lambda_schedule (1.0 from step 0, no hold) is the one the run used.
    assert [r["lambda"] for r in records if "lambda" in r] == [1.0] * cfg.gan.steps
    for name in ("generator_loss", "scst_loss", "caption_loss", "prefix_lm_logits"):
        assert swapped[name].calls > 0, name
    assert "your functions ran: clip_cos_reward" in classroom.calls_report(swapped)


def test_swap_in_refuses_what_the_grader_refuses(tmp_path, restore_project, capsys):
    import cli

    student = tmp_path / "copy.py"
    student.write_text("from cgtgan import scst_loss\n")
    assert cli.main(["train", "--student", str(student)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "imports the project's scst_loss" in err[0]
    plain = tmp_path / "plain.py"
    plain.write_text("def clip_agg_reward(target, caption):\n    return target\n")
    swapped = classroom.swap_in(str(plain))
    assert swapped["clip_agg_reward"]("t", "c", raw=False) == "t"  # the default: dropped
    with pytest.raises(classroom.StudentError, match="no argument 'raw'"):
        swapped["clip_agg_reward"]("t", "c", raw=True)
