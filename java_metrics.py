"""METEOR and SPICE: the two metrics of the COCO caption toolkit that are Java programs.

CgT-GAN (arXiv:2308.12045, Sec. 4.1, Tables 1-3) reports BLEU-1..4, METEOR, ROUGE-L, CIDEr and
SPICE as pycocoevalcap 1.2 computes them. evaluate.py computes BLEU, ROUGE-L and CIDEr-D in pure
Python; METEOR 1.5 and SPICE 1.0 are Java programs, so this file runs the toolkit's own jars with
the toolkit's own settings when they can run:

- `missing(metric)`: None when METEOR or SPICE can run here, else one line saying what is absent
  (Java, pycocoevalcap, SPICE's Stanford CoreNLP jars) and how to get it, so that a caller neither
  shows a traceback nor skips a metric silently.
- `meteor`: through pycocoevalcap's own wrapper (`Meteor`, which keeps one JVM open).
- `spice`: the command pycocoevalcap's `Spice` runs (`java -jar -Xmx8G spice-1.0.jar ... -subset`),
  run here with its output captured, so a Java failure becomes one line instead of a stack trace.

pycocoevalcap ships METEOR complete, but not SPICE's parser: `Spice()` downloads Stanford CoreNLP
3.6.0 into its spice/lib folder on first use. This file never downloads; it says which jars are
missing and the command that fetches them.

Both metrics take PTB-tokenized captions ({id: [tokens]} and {id: [[tokens], ...]}, as
evaluate.score_tokens does), as the toolkit's COCOEvalCap tokenizes before scoring.
"""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

# What SPICE 1.0 needs beside pycocoevalcap's own files: Stanford CoreNLP 3.6.0, which
# pycocoevalcap's get_stanford_models downloads (the zip of CoreNLP 2015-12-09) into spice/lib.
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
GET_CORENLP = "python -m pycocoevalcap.spice.get_stanford_models"
METRICS = ("METEOR", "SPICE")


def toolkit_dir() -> Path | None:
    """The folder of the installed pycocoevalcap package (its jars live below it), or None."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def missing(metric: str) -> str | None:
    """None when `metric` ("METEOR" or "SPICE") can run here, else what is missing, in one line
    with how to get it."""
    if metric not in METRICS:
        raise ValueError(f"unknown Java metric {metric!r}; choose from {', '.join(METRICS)}")
    if shutil.which("java") is None:
        return (f"{metric} needs Java on PATH (a Java runtime, e.g. `apt-get install "
                "default-jre`)")
    folder = toolkit_dir()
    if folder is None:
        return f"{metric} needs the COCO caption toolkit (`pip install pycocoevalcap==1.2`)"
    if metric == "SPICE":
        lib = folder / "spice" / "lib"
        absent = [jar for jar in CORENLP_JARS if not (lib / jar).is_file()]
        if absent:
            return (f"SPICE needs Stanford CoreNLP 3.6.0: {' and '.join(absent)} not in {lib}; "
                    f"get them with `{GET_CORENLP}` (downloads CoreNLP from nlp.stanford.edu)")
    return None


# ----------------------------------------------------------------------------------------------
# The two metrics


def meteor(candidates: dict, references: dict) -> tuple[float, list[float]]:
    """METEOR 1.5 through pycocoevalcap's wrapper: (mean, per-image scores in candidates' order).

    Raises RuntimeError (one line) when it cannot run; `missing("METEOR")` says why beforehand.
    """
    why = missing("METEOR")
    if why:
        raise RuntimeError(why)
    from pycocoevalcap.meteor.meteor import Meteor

    res = {k: [" ".join(v)] for k, v in candidates.items()}
    gts = {k: [" ".join(r) for r in references[k]] for k in candidates}
    try:
        mean, per_image = Meteor().compute_score(gts, res)
    except (OSError, ValueError) as err:  # the JVM did not start, or stopped mid-answer
        raise RuntimeError(f"METEOR failed in Java ({type(err).__name__}: {err})") from None
    return mean, [float(s) for s in per_image]


def _java_error(stderr: str) -> str:
    """The line of Java's output that names the error (its last exception line), shortened."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    named = [line for line in lines if "Exception" in line or "Error" in line]
    return (named or lines or ["no output"])[-1][:200]


def spice(candidates: dict, references: dict) -> tuple[float, list[float]]:
    """SPICE 1.0 (F-score of scene-graph tuples) as pycocoevalcap's `Spice` computes it:
    (mean over images of the "All" F-score, per-image scores in candidates' order).

    The command and its options are the toolkit's, including its parse cache in the toolkit's
    spice/cache folder. Raises RuntimeError (one line, Java's own error named) when it fails.
    """
    why = missing("SPICE")
    if why:
        raise RuntimeError(why)
    folder = toolkit_dir() / "spice"
    items = [{"image_id": k, "test": " ".join(v), "refs": [" ".join(r) for r in references[k]]}
             for k, v in candidates.items()]
    with tempfile.TemporaryDirectory(prefix="spice-") as tmp:
        in_file, out_file = Path(tmp) / "input.json", Path(tmp) / "output.json"
        in_file.write_text(json.dumps(items))
        command = ["java", "-jar", "-Xmx8G", "spice-1.0.jar", str(in_file), "-cache",
                   str(folder / "cache"), "-out", str(out_file), "-subset", "-silent"]
        try:
            done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
        except OSError as err:
            raise RuntimeError(f"SPICE could not start Java ({err})") from None
        if done.returncode != 0 or not out_file.is_file():
            raise RuntimeError(f"SPICE failed: Java exited with status {done.returncode} "
                               f"({_java_error(done.stderr + done.stdout)}); SPICE 1.0 is "
                               "known to run on Java 8")
        results = json.loads(out_file.read_text())
    by_id = {str(r["image_id"]): r["scores"]["All"]["f"] for r in results}
    # The toolkit turns a missing F-score into NaN, and so its mean into NaN; so does this.
    per_image = [math.nan if by_id.get(str(k)) is None else float(by_id[str(k)])
                 for k in candidates]
    return sum(per_image) / max(1, len(per_image)), per_image
