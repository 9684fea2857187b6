"""METEOR and SPICE (java_metrics.py): each one runs where Java and its files are present, and
otherwise is named in one line saying what is missing and how to get it: never a traceback, never
a silent skip. SPICE's Stanford CoreNLP jars are not installed here, so a stand-in `java` (a small
script on PATH that answers as SPICE does) checks the command SPICE gets and how its answer is read.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import stat
import sys

import pytest

import evaluate
import java_metrics

CANDIDATES = {42: ["a", "red", "circle"], 7: ["two", "dogs", "on", "grass"]}
REFERENCES = {42: [["a", "red", "circle", "on", "white"]], 7: [["dogs", "on", "grass"], ["two", "dogs"]]}

# A stand-in for `java -jar spice-1.0.jar IN -cache C -out OUT -subset -silent`: it records its
# arguments and working folder, and writes SPICE's output format with F = (words of the test
# caption) / 10 (null, as SPICE writes an undefined F, when NO_F is in the environment), or fails
# as a JVM does when FAIL is.
FAKE_JAVA = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_JAVA_LOG"], "w") as log:
    json.dump({{"args": args, "cwd": os.getcwd()}}, log)
if os.environ.get("FAIL"):
    print("Exception in thread \\"main\\" java.lang.ExceptionInInitializerError", file=sys.stderr)
    print("Caused by: java.lang.reflect.InaccessibleObjectException: Unable to make field", file=sys.stderr)
    print("\\tat edu.anu.spice.SpiceParser.<init>(SpiceParser.java:178)", file=sys.stderr)
    sys.exit(1)
items = json.load(open(args[3]))
f = (lambda it: None) if os.environ.get("NO_F") else (lambda it: len(it["test"].split()) / 10)
out = [{{"image_id": it["image_id"], "test_tuples": [], "ref_tuples": [],
        "scores": {{"All": {{"pr": 0.5, "re": 0.5, "f": f(it), "fn": 1,
                             "numImages": 1, "fp": 1, "tp": 1}}}}}} for it in items]
json.dump(out, open(args[args.index("-out") + 1], "w"))
"""


@pytest.fixture
def toolkit(tmp_path, monkeypatch):
    """A pycocoevalcap folder with SPICE's jars (empty files) and the stand-in `java` on PATH."""
    folder = tmp_path / "pycocoevalcap"
    (folder / "spice" / "lib").mkdir(parents=True)
    (folder / "spice" / "spice-1.0.jar").write_bytes(b"")
    for jar in java_metrics.CORENLP_JARS:
        (folder / "spice" / "lib" / jar).write_bytes(b"")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    java = bin_dir / "java"
    java.write_text(FAKE_JAVA.format(python=sys.executable))
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_JAVA_LOG", str(tmp_path / "java_log.json"))
    monkeypatch.setattr(java_metrics, "toolkit_dir", lambda: folder)
    return folder, tmp_path / "java_log.json"


def test_spice_runs_the_toolkits_command_and_reads_its_output(toolkit):
    folder, log = toolkit
    mean, per_image = java_metrics.spice(CANDIDATES, REFERENCES)
    assert per_image == [0.3, 0.4] and mean == pytest.approx(0.35)
    ran = json.loads(log.read_text())
    # pycocoevalcap 1.2's Spice.compute_score: the same jar, memory, cache folder and options.
    args = ran["args"]
    assert args[:3] == ["-jar", "-Xmx8G", "spice-1.0.jar"] and ran["cwd"] == str(folder / "spice")
    assert args[4:6] == ["-cache", str(folder / "spice" / "cache")]
    assert args[6] == "-out" and args[8:] == ["-subset", "-silent"]


def test_spice_missing_score_is_nan_as_in_the_toolkit(toolkit, monkeypatch):
    mean, per_image = java_metrics.spice({42: []}, {42: [["a"]]})  # F = 0 / 10
    assert per_image == [0.0] and mean == 0.0
    monkeypatch.setenv("NO_F", "1")
    mean, per_image = java_metrics.spice({42: ["a"]}, {42: [["a"]]})
    assert math.isnan(mean) and math.isnan(per_image[0])


def test_spice_failing_in_java_is_one_line(toolkit, monkeypatch):
    monkeypatch.setenv("FAIL", "1")
    with pytest.raises(RuntimeError) as err:
        java_metrics.spice(CANDIDATES, REFERENCES)
    message = str(err.value)
    assert "\n" not in message and "status 1" in message
    assert "InaccessibleObjectException" in message and "Java 8" in message


def test_spice_without_corenlp_names_the_jars_and_the_command(toolkit):
    folder, _ = toolkit
    (folder / "spice" / "lib" / java_metrics.CORENLP_JARS[1]).unlink()
    why = java_metrics.missing("SPICE")
    assert "\n" not in why and java_metrics.CORENLP_JARS[1] in why
    assert java_metrics.CORENLP_JARS[0] not in why and str(folder / "spice" / "lib") in why
    assert java_metrics.GET_CORENLP in why
    with pytest.raises(RuntimeError, match="Stanford CoreNLP 3.6.0"):
        java_metrics.spice(CANDIDATES, REFERENCES)
    assert java_metrics.missing("METEOR") is None  # METEOR needs no CoreNLP


def test_the_corenlp_command_names_pycocoevalcaps_downloader():
    pytest.importorskip("pycocoevalcap")
    module = java_metrics.GET_CORENLP.split()[-1]
    spec = importlib.util.find_spec(module)
    assert spec is not None and "def get_stanford_models" in open(spec.origin).read()
    assert all(j.startswith("stanford-corenlp-3.6.0") for j in java_metrics.CORENLP_JARS)
    assert "stanford-corenlp-3.6.0" in open(spec.origin).read()


def test_without_java_each_metric_says_so(monkeypatch):
    monkeypatch.setattr(java_metrics.shutil, "which", lambda name: None)
    for metric in java_metrics.METRICS:
        why = java_metrics.missing(metric)
        assert why.startswith(f"{metric} needs Java on PATH") and "\n" not in why
    with pytest.raises(ValueError):
        java_metrics.missing("CIDEr")


def test_without_pycocoevalcap_each_metric_says_how_to_install(monkeypatch):
    monkeypatch.setattr(java_metrics.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(java_metrics, "toolkit_dir", lambda: None)
    for metric in java_metrics.METRICS:
        assert "pip install pycocoevalcap==1.2" in java_metrics.missing(metric)


def test_java_scores_reports_what_it_could_not_compute(monkeypatch):
    monkeypatch.setattr(java_metrics.shutil, "which", lambda name: None)
    scores, notes = evaluate.java_scores({1: "a cat"}, {1: ["a cat sits"]})
    assert scores == {} and notes == [f"{m}: not computed: {java_metrics.missing(m)}"
                                      for m in java_metrics.METRICS]


def test_java_scores_tokenizes_as_the_toolkit(toolkit):
    scores, notes = evaluate.java_scores({1: "A Cat, sitting."}, {1: ["a cat"]}, ["SPICE"])
    assert notes == [] and scores == {"SPICE": pytest.approx(0.3)}  # "a cat sitting": 3 words


def test_evaluate_cli_spice_without_corenlp_is_one_line(toolkit, tmp_path, capsys):
    folder, _ = toolkit
    (folder / "spice" / "lib" / java_metrics.CORENLP_JARS[0]).unlink()
    results = tmp_path / "res.json"
    results.write_text(json.dumps(evaluate.coco_results({"1": "a cat"})))
    annotations = tmp_path / "ann.json"
    annotations.write_text(json.dumps(evaluate.coco_annotations({"1": ["a cat sits"]})))
    assert evaluate.main([str(results), str(annotations), "--spice"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and java_metrics.GET_CORENLP in err


def test_evaluate_cli_spice(toolkit, tmp_path, capsys):
    results = tmp_path / "res.json"
    results.write_text(json.dumps(evaluate.coco_results({"1": "a cat", "2": "two dogs on grass"})))
    annotations = tmp_path / "ann.json"
    annotations.write_text(json.dumps(evaluate.coco_annotations(
        {"1": ["a cat sits"], "2": ["dogs on grass"]})))
    assert evaluate.main([str(results), str(annotations), "--spice", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["SPICE (pycocoevalcap, Java)"] == pytest.approx(0.3)


# ----------------------------------------------------------------------------------------------
# The COCO formats the captions and references are written in


def test_coco_ids_are_integers_only_when_all_are_numbers():
    assert evaluate.coco_ids(["1010", "7"]) == {"1010": 1010, "7": 7}
    assert evaluate.coco_ids(["1010", "img_7"]) == {"1010": "1010", "img_7": "img_7"}
    assert evaluate.coco_results({"3": "a cat"}) == [{"image_id": 3, "caption": "a cat"}]


def test_coco_annotations_round_trip_through_load_references(tmp_path):
    refs = {"shape_1": ["a red circle", "a circle"], "shape_2": ["a square"]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(evaluate.coco_annotations(refs, {"shape_1": "1.png"})))
    content = json.loads(path.read_text())
    assert [a["id"] for a in content["annotations"]] == [0, 1, 2]
    assert content["images"] == [{"id": "shape_1", "file_name": "1.png"}, {"id": "shape_2"}]
    assert evaluate.load_references(path) == refs
