"""The classroom kit: a student release of the project, and a grader that grades only the student.

docs/exercises.md has ten exercises, each one function of CgT-GAN (arXiv:2308.12045) or of the
tools it stands on. A comment line `# exercise: NAME` above a function marks its body as the
answer to exercise NAME. The kit has three commands:

    python classroom.py release OUT_DIR        # the project with every marked body a stub
    python classroom.py check my_solution.py   # one line per exercise: PASS, or FAIL and why
    python classroom.py grade SUBMISSIONS_DIR OUT.csv   # a folder of student files -> a table

The grader (tests/exercises, run by pytest) never runs a student's code in its own process: a
worker process (`python classroom.py worker FILE`, started by the grader) imports the student's
file and answers calls with pickled results, so a submission cannot patch the tests. Before that,
`violations` reads the file with `ast` and rejects one that imports the project's version of a
graded function or reaches into the grader (frames, pytest, dynamic imports).
"""
from __future__ import annotations

import argparse
import ast
import csv
import difflib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STUDENT_ENV = "CGTGAN_STUDENT"
MARKER = "# exercise: "
SOLUTIONS = ROOT / "docs/exercises_solutions.py"
TEMPLATE = ROOT / "docs/exercises_student_template.py"
EXPECTED = "tests/exercises/expected.pt"  # the reference's recorded results, in a release only
TIMEOUT = 30.0  # seconds a student's function may take on one call

# Exercise NAME -> (minutes a student takes, the reference implementation as "module.function").
EXERCISES = {
    "clip_cos_reward": (10, "cgtgan.clip_cos_reward"),
    "clip_agg_target": (25, "cgtgan.clip_agg_target"),
    "clip_agg_reward": (15, "cgtgan.clip_agg_reward"),
    "scst_loss": (25, "cgtgan.scst_loss"),
    "discriminator_loss": (15, "cgtgan.discriminator_loss"),
    "lambda_schedule": (10, "cgtgan.lambda_schedule"),
    "caption_loss": (10, "cgtgan.caption_loss"),
    "contrastive_loss": (10, "clip_model.contrastive_loss"),
    "tfidf_vector": (20, "evaluate.tfidf_vector"),
    "bpe": (30, "clip_tokenizer.bpe"),
    "prefix_lm_logits": (20, "cgtgan.prefix_lm_logits"),
    "caption_log_prob": (10, "cgtgan.caption_log_prob"),
    "generator_loss": (20, "cgtgan.generator_loss"),
}
# Project helpers that would answer an exercise in one call: a submission may not use them.
HELPERS = {"merge_pair": "bpe", "idf_by_df": "tfidf_vector", "cider_d_image": "tfidf_vector",
           "semantic_reward": "clip_agg_reward", "_unit_rows": "clip_agg_target"}
# Ways to reach into the grader or import code by a computed name.
FORBIDDEN_MODULES = {"inspect", "pytest", "_pytest", "importlib", "gc", "ctypes", "builtins",
                     "traceback", "classroom"}
FORBIDDEN_CALLS = {"exec", "eval", "compile", "__import__", "globals", "vars", "breakpoint"}
FORBIDDEN_ATTRS = {"_getframe", "f_back", "f_locals", "f_globals", "modules", "__globals__",
                   "__code__", "__builtins__", "__dict__", "__subclasses__"}


# ----------------------------------------------------------------------------------------------
# Markers and stubs: the student release


def marked_functions(source: str) -> list[tuple[str, ast.FunctionDef]]:
    """[(exercise NAME, its function node)] for each `# exercise: NAME` line above a def (or above
    its decorators), in file order."""
    lines = source.splitlines()
    marks = {i + 1: line.strip()[len(MARKER):].split()[0] for i, line in enumerate(lines)
             if line.strip().startswith(MARKER)}
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            if first - 1 in marks:
                found.append((marks[first - 1], node))
    return sorted(found, key=lambda item: item[1].lineno)


def stub_source(source: str) -> str:
    """The source with each marked function's body replaced by its docstring and
    `raise NotImplementedError`; the rest of the file is unchanged."""
    lines = source.splitlines(keepends=True)
    # Bottom to top, so earlier line numbers stay valid while later bodies are replaced.
    for name, node in reversed(marked_functions(source)):
        body = node.body
        has_doc = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                   and isinstance(body[0].value.value, str))
        if (has_doc and len(body) == 1) or _is_stub(body[-1]):
            continue  # already a stub
        # Everything after the docstring goes, comments included (they would give the answer away).
        start = body[0].end_lineno + 1 if has_doc else body[0].lineno
        indent = " " * body[0].col_offset
        stub = f'{indent}raise NotImplementedError("exercise {name}: see docs/exercises.md")\n'
        lines[start - 1:node.end_lineno] = [stub]
    return "".join(lines)


def _is_stub(stmt: ast.stmt) -> bool:
    return (isinstance(stmt, ast.Raise) and stmt.exc is not None
            and "NotImplementedError" in ast.unparse(stmt.exc))


def project_files(root: Path = ROOT) -> list[str]:
    """The tracked files of the project (git ls-files), relative paths."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True)
    return sorted(p for p in out.stdout.decode().split("\0") if p and (root / p).is_file())


# A release leaves out the tests that need the solutions (they grade the kit itself).
NOT_RELEASED = {"tests/test_exercises_grader.py", "tests/test_classroom.py"}


def release(out: Path) -> list[str]:
    """Writes the student release into `out` (a new or empty folder) -> the stubbed files.

    Every tracked file is copied; a file with `# exercise:` markers is copied with stub bodies
    (docs/exercises_solutions.py among them), and the reference's results on the grader's inputs
    are recorded into tests/exercises/expected.pt, so the release's grader needs no solutions."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: {out} is not empty; give a new folder for the release")
    stubbed = []
    for rel in project_files():
        if rel in NOT_RELEASED:
            continue
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        text = (ROOT / rel).read_text() if rel.endswith(".py") else None
        if text is not None and MARKER in text and marked_functions(text):
            target.write_text(stub_source(text))
            stubbed.append(rel)
        else:
            shutil.copy2(ROOT / rel, target)
    results = grade_file(SOLUTIONS, record=out / EXPECTED)
    failed = [name for name, (ok, _) in results.items() if not ok]
    if failed or not (out / EXPECTED).is_file():
        raise SystemExit(f"error: the solutions fail the grader ({', '.join(failed)}); no release")
    return stubbed


# ----------------------------------------------------------------------------------------------
# The static check of a submission


def violations(source: str, filename: str = "the submission") -> list[str]:
    """One line per construct that is not allowed: importing the project's graded functions (or
    the helpers that compute them), or reaching into the grader's process. [] when clean."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as err:
        return [f"line {err.lineno}: syntax error: {err.msg}"]
    graded = set(EXERCISES) | set(HELPERS)
    project = {p.stem for p in ROOT.glob("*.py")}
    found = []
    for node in ast.walk(tree):
        why = _violation(node, graded, project)
        if why:
            found.append((node.lineno, f"line {node.lineno}: `{ast.unparse(node)[:60]}` {why}"))
    return [text for _, text in sorted(found)]


def _violation(node: ast.AST, graded: set, project: set) -> str | None:
    """Why this node is not allowed, or None."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
        if any(m.split(".")[0] in FORBIDDEN_MODULES for m in modules):
            return "reaches into the grader (inspect, pytest, importlib, ... are not allowed)"
        if isinstance(node, ast.ImportFrom) and modules[0].split(".")[0] in project:
            names = {a.name for a in node.names}
            if "*" in names or names & graded:
                used = ", ".join(sorted(names & graded)) or "everything"
                return f"imports the project's {used}: the exercise is to write it yourself"
    elif isinstance(node, ast.Attribute) and (node.attr in graded or node.attr in FORBIDDEN_ATTRS):
        if node.attr in graded:
            return f"uses the project's {node.attr}: the exercise is to write it yourself"
        return "reaches into the interpreter (frames, module tables) — not allowed"
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.func.id in FORBIDDEN_CALLS:
            return "runs code by a computed name — not allowed"
        if node.func.id in ("getattr", "setattr", "delattr") and not (
                len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
                and node.args[1].value not in graded and node.args[1].value not in FORBIDDEN_ATTRS):
            return "looks up an attribute by a computed or graded name — not allowed"
    return None


# ----------------------------------------------------------------------------------------------
# Calling a function and its gradient (the worker does this for the student, the grader for the
# reference, so both sides are computed the same way)


def call(fn, args: tuple, wrt: tuple = ()) -> tuple:
    """(result, grads): fn(*args) with tensors detached, and for each index in `wrt` the gradient of
    the result (its first element when it is a tuple; summed when it holds many values) with
    respect to that argument (zeros where none flows). Raises GradientError when the result carries no gradient at all."""
    import torch

    args = list(args)
    for i in wrt:
        args[i] = args[i].detach().clone().requires_grad_()
    result = fn(*args)
    grads = []
    if wrt:
        loss = result[0] if isinstance(result, tuple) else result
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            raise GradientError("the result carries no gradient back to its inputs")
        # A result of many values (logits, per-caption log-probs): the gradient of their sum.
        found = torch.autograd.grad(loss.sum(), [args[i] for i in wrt], allow_unused=True)
        grads = [torch.zeros_like(args[i]) if g is None else g for i, g in zip(wrt, found)]
    return detached(result), grads


class GradientError(Exception):
    """The result of a loss cannot be differentiated (everything inside was detached)."""


def detached(x):
    """x with every tensor inside detached and copied (results cross a process boundary)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(detached(v) for v in x)
    if isinstance(x, dict):
        return {k: detached(v) for k, v in x.items()}
    return x


# ----------------------------------------------------------------------------------------------
# The worker process: the only place a student's code runs


def serve(path: str) -> None:
    """`python classroom.py worker FILE`: checks and imports FILE, then answers pickled requests
    (name, args, wrt) from stdin with ("ok", result, grads) or ("error", type, message, line)."""
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the student's prints go to stderr, never into the replies
    sys.stdout = sys.stderr

    def send(message) -> None:
        pickle.dump(message, channel)
        channel.flush()

    problems = violations(Path(path).read_text(), path)
    if problems:
        return send(("rejected", problems))
    import torch

    torch.set_num_threads(1)  # tiny tensors: more threads only spin on a shared machine
    for folder in (ROOT, Path(path).resolve().parent):
        sys.path.insert(0, str(folder))
    hide_references()
    try:
        module = load_file(path)
    except Exception as err:  # the student's file may fail in any way: report it, do not crash
        return send(("broken", f"{type(err).__name__}: {err}", _student_line(err, path)))
    send(("ready", sorted(n for n in EXERCISES if callable(getattr(module, n, None)))))
    while True:
        try:
            name, args, wrt = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        try:
            send(("ok", *call(getattr(module, name), args, wrt)))
        except Exception as err:  # any mistake in the student's code becomes a grader message
            send(("error", type(err).__name__, str(err), _student_line(err, path)))


def load_file(path: str):
    """The module of a Python file, imported by path as `cgtgan_student`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("cgtgan_student", Path(path).resolve())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hide_references() -> None:
    """Replaces the project's graded functions (and their helpers) in this process by functions
    that refuse, so a submission that slips past `violations` still cannot call them."""
    import importlib

    for name, (_, where) in EXERCISES.items():
        module = importlib.import_module(where.split(".")[0])
        for hidden in [name] + [h for h, of in HELPERS.items() if of == name]:
            if hasattr(module, hidden):
                setattr(module, hidden, _refuse(hidden))


def _refuse(name: str):
    def refused(*args, **kwargs):
        raise RuntimeError(f"the grader hides the project's {name}: write it yourself")
    return refused


def _student_line(err: BaseException, path: str) -> int | None:
    """The last line of the student's file in the exception's traceback."""
    line, tb, target = None, err.__traceback__, str(Path(path).resolve())
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == target:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


class Worker:
    """The grader's handle on a worker process. `start()` -> ("ready", names) | ("rejected",
    lines) | ("broken", message, line); `request(name, args, wrt)` -> the worker's reply, or
    ("timeout",) after `timeout` seconds (the worker is then ended and restarted on next use)."""

    def __init__(self, path: str, timeout: float = TIMEOUT):
        self.path, self.timeout, self.proc = str(path), timeout, None

    def spawn(self) -> None:
        """Starts the process without waiting for it (it imports torch while pytest collects)."""
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "classroom.py"), "worker", self.path],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def start(self):
        if self.proc is None or self.proc.poll() is not None:
            self.spawn()
        return self._reply(timeout=120.0)

    def request(self, name: str, args: tuple, wrt: tuple = ()):
        if self.proc is None or self.proc.poll() is not None:
            status = self.start()
            if status[0] != "ready":
                return ("error", "RuntimeError", "the worker did not restart", None)
        try:
            pickle.dump((name, args, tuple(wrt)), self.proc.stdin)
            self.proc.stdin.flush()
        except BrokenPipeError:
            return ("error", "RuntimeError", "the worker process died", None)
        return self._reply(self.timeout)

    def _reply(self, timeout: float):
        import queue
        import threading

        box = queue.Queue()

        def read() -> None:
            try:
                box.put(pickle.load(self.proc.stdout))
            except Exception as err:  # EOF or a broken pickle: the worker died
                box.put(("error", "RuntimeError", f"the worker process died ({err})", None))

        threading.Thread(target=read, daemon=True).start()
        try:
            return box.get(timeout=timeout)
        except queue.Empty:
            self.close()
            return ("timeout",)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


# ----------------------------------------------------------------------------------------------
# A training run with the student's functions (`python cgtgan.py train --student FILE`)


class StudentError(ValueError):
    """A student file that cannot go into a run: the message is one line."""


def written_functions(source: str) -> tuple[list[str], list[str]]:
    """(exercises the file defines with a body, exercises it leaves as NotImplementedError stubs)."""
    stub = {}  # the last definition of a name is the one Python keeps
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name in EXERCISES:
            stub[node.name] = _is_stub(node.body[-1])
    return [n for n, s in stub.items() if not s], [n for n, s in stub.items() if s]


def swap_in(path: str) -> dict:
    """Puts the student's written exercise functions into the project for this process's run:
    {NAME: the function the run now calls}; each counts its calls in `.calls`.

    The file is checked as the grader checks it (`violations`) and imported by path; a stub left
    as NotImplementedError is not swapped. Every loaded project module that holds the reference
    function (its own module, and those that imported it by name, like train.py) gets the
    student's instead, so the real training path runs it."""
    import importlib

    source = Path(path).read_text()
    problems = violations(source, path)
    if problems:
        raise StudentError(f"{path}: {problems[0]}")
    try:
        module = load_file(path)
    except Exception as err:  # the student's file may fail in any way: one line, not a traceback
        raise StudentError(f"{path} failed to import: {type(err).__name__}: {err}") from None
    importlib.import_module("commands")  # every module of a run, so each binding is found
    swapped = {}
    for name in written_functions(source)[0]:
        home, attr = EXERCISES[name][1].split(".")
        reference = getattr(importlib.import_module(home), attr)
        swapped[name] = student = _adapted(getattr(module, name), reference, name)
        setattr(module, name, student)  # the student's own calls of it count too
        for loaded in list(sys.modules.values()):
            if Path(getattr(loaded, "__file__", None) or "/").parent == ROOT:
                for key, value in list(vars(loaded).items()):
                    if value is reference:
                        setattr(loaded, key, student)
    return swapped


def _adapted(student, reference, name: str):
    """The student's function, called as the project calls the reference: keyword arguments the
    student's signature lacks are dropped while they hold the reference's default (the plain
    equation), and refused when the run needs another value (e.g. clip_agg_reward's raw=True)."""
    import functools
    import inspect as signatures

    accepts = signatures.signature(student).parameters
    defaults = {k: p.default for k, p in signatures.signature(reference).parameters.items()}
    open_kwargs = any(p.kind is p.VAR_KEYWORD for p in accepts.values())

    @functools.wraps(student)
    def run(*args, **kwargs):
        run.calls += 1
        for key in [k for k in kwargs if k not in accepts and not open_kwargs]:
            if kwargs[key] != defaults.get(key):
                raise StudentError(f"your {name}() has no argument {key!r}, and this run sets "
                                   f"{key}={kwargs[key]!r}; add it, or run without that setting")
            del kwargs[key]
        return student(*args, **kwargs)

    run.calls = 0
    return run


def swap_report(path: str, swapped: dict, stubs: list[str]) -> str:
    """The line a run prints: which of the student's functions it uses, which it leaves."""
    names = ", ".join(swapped) or "none (no exercise function with a body)"
    left = f"; not written yet, the project's: {', '.join(stubs)}" if stubs else ""
    return f"--student {path}: this run uses your {names}{left}"


def calls_report(swapped: dict) -> str:
    """The line after a run: how often each of the student's functions ran (0: never reached)."""
    ran = ", ".join(f"{name} {fn.calls}x" for name, fn in swapped.items())
    return f"your functions ran: {ran}" if swapped else "no function of yours ran"


# ----------------------------------------------------------------------------------------------
# Grading: one file, then a folder of them


def no_student_message() -> str:
    """The one-line refusal when no student file is given (naming a near-miss variable if set)."""
    near = difflib.get_close_matches(STUDENT_ENV, [k for k in os.environ if k != STUDENT_ENV],
                                     n=1, cutoff=0.75)
    typo = f" ({near[0]} is set: a typo?)" if near else ""
    return (f"no student file to grade: set {STUDENT_ENV}=path/to/my_solution.py{typo}, or run "
            "python classroom.py check path/to/my_solution.py")


def grade_file(path, names=None, record: Path | None = None) -> dict[str, tuple[bool, str]]:
    """{exercise: (passed, first failure message)} of the grader (tests/exercises) run on the file
    `path` in a separate pytest process; `names` limits it to some exercises. With `record`, the
    reference's results are saved there (what a release ships instead of the reference)."""
    names = list(names or EXERCISES)
    problems = violations(Path(path).read_text(), str(path))
    if problems:  # the grader would say the same in every test: say it without running it
        return {name: (False, "rejected: " + "; ".join(problems)) for name in names}
    env = {**os.environ, STUDENT_ENV: str(Path(path).resolve())}
    if record is not None:
        env["CGTGAN_RECORD"] = str(Path(record).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        proc = subprocess.run([sys.executable, "-m", "pytest", "tests/exercises", "-q", "-p",
                               "no:cacheprovider", f"--junitxml={report}", "-k", " or ".join(names)],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        if not report.is_file():
            lines = (proc.stdout + proc.stderr).strip().splitlines() or ["no output"]
            raise SystemExit(f"error: the grader did not run: {lines[-1]}")
        results = {name: (True, "") for name in names}
        for case in ET.parse(report).getroot().iter("testcase"):
            bad = next((c for c in case if c.tag in ("failure", "error")), None)
            exercise = exercise_of(case.get("name"))
            if bad is not None and exercise in results and results[exercise][0]:
                message = bad.get("message", "").removeprefix("Failed: ").strip()
                results[exercise] = (False, message.splitlines()[0] if message else "failed")
    return results


def exercise_of(test_name: str) -> str | None:
    """The exercise a grader test belongs to: test_<NAME>_<what it checks>."""
    names = [n for n in EXERCISES if test_name.startswith(f"test_{n}_")]
    return max(names, key=len) if names else None


def report_lines(results: dict[str, tuple[bool, str]]) -> list[str]:
    """One line per exercise: PASS or FAIL, the exercise, and for a failure what is wrong."""
    width = max(map(len, results))
    rejected = {m for _, m in results.values() if m.startswith("rejected: ")}
    lines = [f"rejected: {why}" for m in rejected for why in m[len("rejected: "):].split("; ")]
    lines += [f"{'PASS' if ok else 'FAIL'}  {name:<{width}}  "
              f"{'rejected (see above)' if message in rejected else message}".rstrip()
              for name, (ok, message) in results.items()]
    passed = sum(ok for ok, _ in results.values())
    return lines + [f"{passed} of {len(results)} exercises pass"]


def grade_folder(folder: Path, out_csv: Path) -> list[dict]:
    """Grades every *.py file of `folder` (one per student, named after the student) and writes a
    CSV: student, one column per exercise (pass/fail), passed, and the first failure's message."""
    rows = []
    for file in sorted(Path(folder).glob("*.py")):
        results = grade_file(file)
        row = {"student": file.stem, **{n: "pass" if ok else "fail" for n, (ok, _) in results.items()}}
        row["passed"] = sum(ok for ok, _ in results.values())
        row["first_failure"] = next((f"{n}: {m}" for n, (ok, m) in results.items() if not ok), "")
        rows.append(row)
        print(f"{file.stem}: {row['passed']} of {len(results)} exercises pass", flush=True)
    with open(out_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["student", *EXERCISES, "passed", "first_failure"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="classroom.py", description="The cgtgan classroom kit "
                                     "(docs/exercises.md): release, check, grade.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("release", help="write the student release (stubs, grader, no solutions)")
    p.add_argument("out", type=Path, help="a new folder")
    p = sub.add_parser("check", help="grade one student file, one line per exercise")
    p.add_argument("student", nargs="?", help=f"the student's file (default: ${STUDENT_ENV})")
    p.add_argument("-k", dest="names", action="append", choices=list(EXERCISES),
                   help="only this exercise (repeatable)")
    p = sub.add_parser("grade", help="grade a folder of student files into a CSV")
    p.add_argument("folder", type=Path, help="a folder of *.py files, one per student")
    p.add_argument("out_csv", type=Path, help="the table to write")
    p = sub.add_parser("worker", help=argparse.SUPPRESS)
    p.add_argument("student")
    sub.add_parser("times", help="each exercise and the minutes it takes")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "worker":
        serve(args.student)
    elif args.command == "release":
        stubbed = release(args.out)
        print(f"wrote the student release to {args.out} (stubs in {', '.join(stubbed)})")
    elif args.command == "check":
        student = args.student or os.environ.get(STUDENT_ENV, "").strip()
        if not student:
            print(f"error: {no_student_message()}", file=sys.stderr)
            return 2
        if not Path(student).is_file():
            print(f"error: {student}: no such file (give the path of your solution file)", file=sys.stderr)
            return 2
        results = grade_file(student, args.names)
        print(f"grading {student}")
        print("\n".join(report_lines(results)))
        return 0 if all(ok for ok, _ in results.values()) else 1
    elif args.command == "grade":
        rows = grade_folder(args.folder, args.out_csv)
        print(f"wrote {args.out_csv}: {len(rows)} students")
    elif args.command == "times":
        for name, (minutes, where) in EXERCISES.items():
            print(f"{minutes:3d} min  {name}  (reference: {where})")
        print(f"{sum(m for m, _ in EXERCISES.values()):3d} min  in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
