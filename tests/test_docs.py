"""The teaching documents stay true to the code: docs/paper_map.md, docs/exercises.md, the figure.

- paper_map.md is what docs/make_paper_map.py writes today, each of its line links points at the
  definition it names, and it covers every equation function of cgtgan.py;
- every command of exercises.md parses with the real CLI (override keys and values checked), each
  exercise has its grader tests and a template function, and its Python example prints what the
  page says;
- docs/make_figure.py draws the method figure.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REGENERATE = "run `python docs/make_paper_map.py` and commit docs/paper_map.md"
EXERCISES = ("clip_cos_reward", "clip_agg_target", "clip_agg_reward", "scst_loss",
             "discriminator_loss", "lambda_schedule", "caption_loss", "contrastive_loss",
             "tfidf_vector", "bpe", "prefix_lm_logits", "caption_log_prob", "generator_loss")
LINK = re.compile(r"\[`([^`]+)`\]\(\.\./([^)#]+)#L(\d+)\)")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------
# docs/paper_map.md


def test_paper_map_is_generated_from_the_current_source():
    text = (DOCS / "paper_map.md").read_text()
    assert text == load_script("make_paper_map").render(), f"docs/paper_map.md is stale: {REGENERATE}"


def _defines(lines: list[str], number: int, dotted: str) -> bool:
    """Line `number` (1-based) defines the last part of `dotted`, inside the class before it."""
    *outer, name = dotted.split(".")
    line = lines[number - 1]
    if not re.match(rf"\s*((async\s+)?def|class)\s+{re.escape(name)}\b|\s*{re.escape(name)}\s*[:=]",
                    line):
        return False
    indent = len(line) - len(line.lstrip())
    for owner in reversed(outer):
        for previous in reversed(lines[:number - 1]):
            stripped = previous.lstrip()
            if stripped and len(previous) - len(stripped) < indent:
                if not re.match(rf"class\s+{re.escape(owner)}\b", stripped):
                    return False
                indent = len(previous) - len(stripped)
                break
    return True


def test_paper_map_links_point_at_their_definitions():
    links = LINK.findall((DOCS / "paper_map.md").read_text())
    assert len(links) > 40
    for label, path, number in links:
        file = ROOT / path
        assert file.is_file(), f"paper_map.md links to {path}, which does not exist; {REGENERATE}"
        lines = file.read_text().splitlines()
        # Code links are labelled module.name (name may be Class.member); test links test_name.
        dotted = label if label.startswith("test_") else label.split(".", 1)[1]
        assert int(number) <= len(lines) and _defines(lines, int(number), dotted), (
            f"paper_map.md: {path}#L{number} is not where {label} is defined; {REGENERATE}")


def test_paper_map_covers_every_equation_of_the_method():
    labels = {label for label, _, _ in LINK.findall((DOCS / "paper_map.md").read_text())}
    names = {label.split(".", 1)[1].split(".")[0] for label in labels if not label.startswith("test_")}
    for name in ("MappingNetwork", "CaptionGenerator", "Discriminator", "caption_loss",
                 "naturalness_reward", "discriminator_loss", "clip_cos_reward", "clip_agg_target",
                 "clip_agg_reward", "semantic_reward", "scst_loss", "lambda_schedule", "gan_step",
                 "cider_d", "score"):
        assert name in names, f"paper_map.md does not map {name}; add a row in docs/make_paper_map.py"
    text = (DOCS / "paper_map.md").read_text()
    for term in ("Text-only initialisation", "Self-critical", "Reward mixing", "Lambda schedule",
                 "Optimisation", "CLIP-agg target", "CLIP-agg reward", "CLIP-cos", "Naturalness"):
        assert term in text, f"paper_map.md has no row for {term}"


# ----------------------------------------------------------------------------------------------
# docs/exercises.md


def _sections() -> dict[str, str]:
    """{exercise NAME: its section of exercises.md} from headings `## n. `NAME` (m min)`."""
    text = (DOCS / "exercises.md").read_text()
    parts = re.split(r"^## \d+\. `(\w+)` \((\d+) min\)$", text, flags=re.M)
    return {parts[i]: parts[i + 2] for i in range(1, len(parts), 3)}


def test_every_exercise_has_a_section_a_grader_and_a_template():
    sections = _sections()
    assert tuple(sections) == EXERCISES
    grader = (ROOT / "tests/exercises/test_exercises.py").read_text()
    spec = importlib.util.spec_from_file_location("template", DOCS / "exercises_student_template.py")
    template = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(template)
    import classroom

    for name, body in sections.items():
        command = f"CGTGAN_STUDENT=my_solution.py python -m pytest tests/exercises -k {name}"
        assert command in body, f"exercise {name}: no grading command `{command}`"
        assert re.search(rf"^def test_{name}_", grader, flags=re.M), f"no grader test for {name}"
        assert callable(getattr(template, name, None)), f"the template has no {name}()"
        assert name in classroom.EXERCISES, f"classroom.EXERCISES has no {name}"
        assert "**Experiment.**" in body and "python" in body, f"exercise {name}: no experiment"
        with pytest.raises(NotImplementedError):
            getattr(template, name)(*[None] * _arity(getattr(template, name)))


def test_exercise_times_and_template_follow_the_kit():
    """The headings' minutes are classroom.EXERCISES's, and the template is the solutions file
    with every body stubbed (the same signatures and statements)."""
    import ast

    import classroom

    text = (DOCS / "exercises.md").read_text()
    minutes = {m[0]: int(m[1]) for m in re.findall(r"^## \d+\. `(\w+)` \((\d+) min\)$", text, flags=re.M)}
    assert minutes == {name: m for name, (m, _) in classroom.EXERCISES.items()}

    def functions(source: str) -> dict:
        return {n.name: ast.dump(n) for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}

    stubbed = classroom.stub_source(classroom.SOLUTIONS.read_text())
    assert functions(classroom.TEMPLATE.read_text()) == functions(stubbed), (
        "docs/exercises_student_template.py differs from the stubbed docs/exercises_solutions.py")


def _arity(fn) -> int:
    import inspect

    return sum(p.default is inspect.Parameter.empty for p in inspect.signature(fn).parameters.values())


def _cli_commands() -> list[str]:
    text = (DOCS / "exercises.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip().startswith("python cgtgan.py")]


def test_exercise_commands_parse_with_the_real_cli(monkeypatch, capsys):
    import cli
    import commands

    seen = []

    def capture(cfg, *args, **kwargs):
        seen.append(cfg)

    for name in ("run_train", "run_init", "run_ablation"):
        monkeypatch.setattr(commands, name, capture)
    students = []  # --student files: the page names the student's own, which do not exist here
    monkeypatch.setattr(cli, "swap_student", lambda path: students.append(path) or {})
    commands = _cli_commands()
    assert len(commands) >= 15
    for command in commands:
        argv = shlex.split(command)[2:]
        assert cli.main(argv) == 0, (f"exercises.md: `{command}` is refused by the CLI: "
                                        f"{capsys.readouterr().err.strip()}")
    assert len(seen) == len(commands)
    assert {c.gan.temperature for c in seen} >= {10.0, 100.0, 1000.0}
    assert len([p for p in students if p]) >= 3  # the step exercises' experiments run your code


def test_exercise_python_example_prints_what_the_page_says(capsys):
    text = (DOCS / "exercises.md").read_text()
    (code,) = re.findall(r"```python\n(import evaluate.*?)```", text, flags=re.S)
    exec(compile(code, "exercises.md", "exec"), {})
    printed = [float(x) for x in capsys.readouterr().out.split()]
    claimed = [float(x) for x in re.search(r"# ([\d.]+) ([\d.]+)", code).groups()]
    assert printed == pytest.approx(claimed, abs=0.01)


# ----------------------------------------------------------------------------------------------
# docs/make_figure.py


def test_method_figure_draws(tmp_path):
    from PIL import Image

    figure = load_script("make_figure")
    out = tmp_path / "method.png"
    figure.main([str(out)])
    drawn = Image.open(out)
    committed = Image.open(DOCS / "method.png")
    assert drawn.size == committed.size and drawn.mode == "RGB"
    # Mostly white paper with coloured boxes: neither blank nor a solid fill.
    colours = drawn.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 20
    assert max(colours)[1] == (255, 255, 255)


# ----------------------------------------------------------------------------------------------
# docs/walkthrough.md


NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def same_page(got: str, want: str, rel: float = 2e-2, abs_: float = 2e-3,
              numbers: bool = True) -> str | None:
    """None when two generated pages have the same words and numbers equal to float rounding
    (another machine or torch build rounds the last digits differently; numbers=False: the
    words and shapes alone); else the first difference, in words."""
    for n, (a, b) in enumerate(zip(got.splitlines(), want.splitlines()), 1):
        if NUMBER.sub("#", a) != NUMBER.sub("#", b):
            return f"line {n} differs: {a!r} vs {b!r}"
        for x, y in zip(map(float, NUMBER.findall(a)), map(float, NUMBER.findall(b))):
            if not numbers:
                break
            if abs(x - y) > abs_ + rel * abs(y):
                return f"line {n}: {x} vs {y}"
    if len(got.splitlines()) != len(want.splitlines()):
        return "the pages have different lengths"
    return None


def test_same_page_tolerates_rounding_and_nothing_else():
    assert same_page("| `x` | `(2, 3)` | 0.1234, -5.5 |", "| `x` | `(2, 3)` | 0.1235, -5.5 |") is None
    assert "line 1" in same_page("| `x` | `(2, 4)` | 0.1 |", "| `x` | `(2, 3)` | 0.1 |")
    assert "line 1" in same_page("lam = 0.5", "lam = 0.25")
    assert "differs" in same_page("r_cos", "r_agg")


def test_walkthrough_is_generated_from_the_current_code(tmp_path):
    """docs/walkthrough.md is what make_walkthrough.py writes now (one real gan_step on a tiny
    ShapesWorld built in tmp_path, one thread): run the script again when this fails."""
    import transformers

    out = tmp_path / "walkthrough.md"
    load_script("make_walkthrough").main([str(out)])
    want = (DOCS / "walkthrough.md").read_text()
    # Another transformers version initialises the models otherwise: then words and shapes only.
    made_with = re.search(r"Values from transformers (\S+) ", want)
    numbers = made_with is not None and made_with.group(1) == transformers.__version__
    difference = same_page(out.read_text(), want, numbers=numbers)
    assert difference is None, (f"docs/walkthrough.md is stale ({difference}): run "
                                "python docs/make_walkthrough.py")
