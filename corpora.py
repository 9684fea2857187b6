"""External corpora of CgT-GAN's settings, made from their public files as the official code does.

CgT-GAN (arXiv:2308.12045, Sec. 4.1) trains a captioner on images and an unpaired text corpus.
In-UIC takes the corpus from the same dataset's captions; Cross-UIC from another dataset's
captions (Flickr30k, COCO) or from web text (ShutterStock, Google Conceptual Captions); ZS-IC
trains on web images with a web corpus. The official code (Lihr747/CgtGAN, preprocess/) cleans
each corpus its own way before embedding it. This file applies the same per-sentence rules and
writes one sentence per line, the files the presets read (config.PRESETS):

    python cgtgan.py corpus flickr30k data/dataset_flickr30k.json data/flickr30k_captions.txt
    python cgtgan.py corpus gcc data/Train_GCC-training.tsv data/gcc.txt
    python cgtgan.py corpus shutterstock data/shutterstock_captions.txt data/shutterstock.txt
    python cgtgan.py corpus web-images data/web data/dataset_web.json

The last one writes the ZS-IC image list: a Karpathy-format file listing every image under a
folder as "train", without captions. realdata.py reads these files and applies the project's own
cleaning on top (realdata.clean_sentences), as it does to every corpus.

The rules, per corpus (a "punctuation token" is one of string.punctuation's characters or the PTB
tokenizer's punctuation tokens, the official set):
- COCO / Flickr30k captions (`caption_sentence`): the "raw" sentences of the Karpathy split's
  train images (train + restval); one trailing punctuation character removed, "." appended, the
  first letter capitalised; no length filter.
- GCC (`gcc_sentence`): a leading and a trailing punctuation token removed, the caption cut at its
  first "." token; captions of <= 6 or >= 20 words dropped, and those of 16-19 words too (below).
- ShutterStock (`shutterstock_sentence`): a leading and a trailing punctuation token removed, then
  split at " : ", " ; ", " . " and " - "; only the first fragment is kept, if it has > 6 tokens and
  > 5 that are not punctuation; of those, 16-19-token fragments are kept with p = 0.3 and fragments
  of >= 20 tokens with p = 0.1.
"""
from __future__ import annotations

import functools
import os
import re
import string
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from data import DataError, atomic_write, read_json, write_json

# The official preprocessing's punctuation: Python's punctuation characters and the tokens
# pycocoevalcap's PTB tokenizer treats as punctuation.
PUNCTUATION = frozenset(string.punctuation) | frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
     "...", ";"])
# Where ShutterStock's sentences split into fragments (the official `sep_pattern`).
FRAGMENT_SEPARATOR = re.compile(r" : | ; | \. | - ")
IMAGE_EXTENSIONS = frozenset([".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"])
# A progress bar shows once an input has taken this long (seconds): long inputs get one, the
# small ones of tests and fixtures stay quiet.
PROGRESS_DELAY = 2.0
# Where each input comes from, for the error that says an input is missing.
SOURCES = {
    "coco": "Karpathy's split file dataset_coco.json (caption_datasets.zip, "
            "cs.stanford.edu/people/karpathy/deepimagesent)",
    "flickr30k": "Karpathy's split file dataset_flickr30k.json (caption_datasets.zip, "
                 "cs.stanford.edu/people/karpathy/deepimagesent)",
    "gcc": "Conceptual Captions' training file Train_GCC-training.tsv (caption<TAB>url lines, "
           "ai.google.com/research/ConceptualCaptions/download)",
    "shutterstock": "the ShutterStock captions of the UIC project (github.com/fengyang0317/"
                    "unsupervised_captioning, issue 42) as a text file, one caption per line",
    "web-images": "a folder of training images (ZS-IC: images from the web, no captions)",
}

# ----------------------------------------------------------------------------------------------
# One sentence at a time: the official rules


def capitalise(text: str) -> str:
    """The first character upper-cased, the rest as it is (official: `str.upper(s[0]) + s[1:]`)."""
    return text[:1].upper() + text[1:]


def strip_punctuation_tokens(tokens: list[str]) -> list[str]:
    """Without one leading and one trailing punctuation token (official, GCC and ShutterStock)."""
    if tokens and tokens[0] in PUNCTUATION:
        tokens = tokens[1:]
    if tokens and tokens[-1] in PUNCTUATION:
        tokens = tokens[:-1]
    return tokens


def caption_sentence(raw: str) -> str | None:
    """A COCO / Flickr30k caption as the official corpus has it: "a dog on a couch ." -> "A dog on
    a couch." (one trailing punctuation character dropped, "." appended, first letter capitalised).

    Whitespace is tidied first: the official script checks the raw last character, so a caption
    ending in a space kept its own period and got a second one ("A dog. ."). None if empty.
    """
    text = " ".join(raw.split())
    if text and text[-1] in PUNCTUATION:
        text = text[:-1].rstrip()
    return capitalise(text) + "." if text else None


def gcc_sentence(caption: str, keep_16_19: Callable[[], bool] | None = None) -> str | None:
    """A Conceptual Captions caption as the official GCC corpus has it, or None if dropped.

    Captions are cut at their first "." token and kept at 7-15 words. The official script means to
    keep 16-19-word captions with p = 0.3, but calls np.random.seed(0) inside its loop, so its draw
    is always 0.549 and it drops them all; that effective behaviour is the default here (None).
    `keep_16_19` (a draw: True keeps) gives the intended one instead.
    """
    tokens = strip_punctuation_tokens(caption.split())
    if "." in tokens:
        tokens = tokens[:tokens.index(".")]
    n = len(tokens)
    if n <= 6 or n >= 20:
        return None
    if n >= 16 and (keep_16_19 is None or not keep_16_19()):
        return None
    return capitalise(" ".join(tokens)) + "."


def shutterstock_sentence(caption: str, draw: Callable[[], float]) -> str | None:
    """A ShutterStock caption as the official corpus has it: its first fragment, or None.

    The fragment must have > 6 tokens and > 5 non-punctuation tokens; then one uniform draw (made
    only for such fragments, as in the official script) keeps 16-19-token fragments when < 0.3 and
    fragments of >= 20 tokens when < 0.1. Later fragments are never used.
    """
    fragment = FRAGMENT_SEPARATOR.split(" ".join(strip_punctuation_tokens(caption.split())))[0]
    tokens = fragment.split(" ")
    words = sum(token not in PUNCTUATION for token in tokens)
    if len(tokens) <= 6 or words <= 5:
        return None
    u = draw()
    if (16 <= len(tokens) <= 19 and u >= 0.3) or (len(tokens) >= 20 and u >= 0.1):
        return None
    return capitalise(fragment) + "."


# ----------------------------------------------------------------------------------------------
# Reading the public files (one-line errors naming the file)


def check_input(path: Path, kind: str, folder: bool = False) -> None:
    """A missing input, or a folder where a file belongs (or the reverse), stops in one line."""
    if not path.exists():
        raise DataError(f"{kind} input {path} does not exist; it is {SOURCES[kind]}")
    if folder != path.is_dir():
        raise DataError(f"{kind} input {path} is {'not ' if folder else ''}a folder; "
                        f"give {SOURCES[kind]}")


def _bar(total: int | None, kind: str, unit: str) -> tqdm:
    return tqdm(total=total, desc=f"corpus {kind}", unit=unit, unit_scale=True, leave=False,
                delay=PROGRESS_DELAY, dynamic_ncols=True)


def read_lines(path: Path, kind: str, errors: str = "strict") -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file, with a progress bar in bytes for long files.
    errors="ignore" drops undecodable bytes (as the official GCC script reads its TSV)."""
    check_input(path, kind)
    with open(path, "rb") as f, _bar(path.stat().st_size, kind, "B") as bar:
        for number, raw in enumerate(f, 1):
            bar.update(len(raw))
            try:
                yield number, raw.decode("utf-8", errors).rstrip("\r\n")
            except UnicodeDecodeError:
                raise DataError(f"{kind} input {path}: line {number} is not UTF-8 text; "
                                f"is it {SOURCES[kind]}?") from None


def karpathy_train_captions(path: Path, kind: str) -> Iterator[str]:
    """The "raw" sentences of a Karpathy split file's train and restval images, in file order."""
    check_input(path, kind)
    content = read_json(path)
    images = content.get("images") if isinstance(content, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{kind} input {path} has no 'images' list; is it {SOURCES[kind]}?")
    for k, image in enumerate(tqdm(images, desc=f"corpus {kind}", unit=" images", leave=False,
                                   delay=PROGRESS_DELAY)):
        try:
            if image["split"] in ("train", "restval"):
                yield from (str(s["raw"]) for s in image["sentences"])
        except (KeyError, TypeError):
            raise DataError(f"{kind} input {path}: image entry {k} lacks a split or "
                            "sentences[].raw; is it a Karpathy split file?") from None


def gcc_captions(path: Path) -> Iterator[str]:
    """The captions of the Conceptual Captions TSV (caption<TAB>url per line)."""
    for number, line in read_lines(path, "gcc", errors="ignore"):
        if not line.strip():
            continue
        if "\t" not in line:
            raise DataError(f"gcc input {path}: line {number} has no tab, so it is not "
                            f"caption<TAB>url; give {SOURCES['gcc']}")
        yield line.split("\t", 1)[0]


# ----------------------------------------------------------------------------------------------
# The builders: public file -> corpus file (one sentence per line), or image folder -> image list


def corpus_sentences(kind: str, source: Path, seed: int = 0,
                     gcc_intended: bool = False) -> tuple[int, list[str]]:
    """(captions read, the corpus's sentences in input order) for kind coco | flickr30k | gcc |
    shutterstock. `seed` seeds the random draws: ShutterStock's, and GCC's with gcc_intended.

    The draws are NumPy's RandomState(seed).rand(), one per eligible sentence, as the official
    scripts draw them after np.random.seed(0): with seed 0, given the same captions in the same
    order, ShutterStock keeps the sentences the official script keeps.
    """
    rng = np.random.RandomState(seed)
    if kind in ("coco", "flickr30k"):
        captions, rule = karpathy_train_captions(source, kind), caption_sentence
    elif kind == "gcc":
        keep = (lambda: rng.rand() < 0.3) if gcc_intended else None
        captions, rule = gcc_captions(source), functools.partial(gcc_sentence, keep_16_19=keep)
    elif kind == "shutterstock":
        captions = (line for _, line in read_lines(source, kind) if line.strip())
        rule = functools.partial(shutterstock_sentence, draw=rng.rand)
    else:
        raise DataError(f"unknown corpus {kind!r}; choose from {', '.join(SOURCES)}")
    read, sentences = 0, []
    for caption in captions:
        read += 1
        sentence = rule(caption)
        if sentence is not None:
            sentences.append(sentence)
    return read, sentences


def web_image_list(folder: Path) -> dict:
    """A Karpathy-format split file listing every image file under `folder` (sorted, hidden files
    left out) as a "train" image without sentences: the ZS-IC training images. Paths are
    folder/filepath/filename, as realdata.read_karpathy joins them."""
    check_input(folder, "web-images", folder=True)
    entries = []
    with _bar(None, "web-images", " images") as bar:
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            relative = Path(root).relative_to(folder).as_posix()
            for name in sorted(files):
                if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                entry = {"filepath": relative} if relative != "." else {}
                entries.append({**entry, "filename": name, "imgid": len(entries), "split": "train",
                                "sentences": []})
                bar.update(1)
    if not entries:
        raise DataError(f"web-images input {folder} holds no image files "
                        f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return {"images": entries, "dataset": "web"}


def build(kind: str, source: str | Path, output: str | Path, seed: int = 0,
          gcc_intended: bool = False) -> dict:
    """Write `output` from the public file `source` (see the module docstring) and return a
    summary: {"kind", "source", "output", "read", "written"}. The output is written atomically
    and never over the input."""
    source, output = Path(source), Path(output)
    if output.exists() and source.exists() and output.resolve() == source.resolve():
        raise DataError(f"corpus output {output} is its input; give another output path")
    if output.is_dir():
        raise DataError(f"corpus output {output} is a folder; give a file path")
    if kind == "web-images":
        image_list = web_image_list(source)
        write_json(output, image_list)
        read = written = len(image_list["images"])
    else:
        read, sentences = corpus_sentences(kind, source, seed, gcc_intended)
        if not sentences:
            raise DataError(f"{kind} input {source}: none of its {read} captions survives the "
                            f"official preprocessing; is it {SOURCES[kind]}?")
        text = "".join(s + "\n" for s in sentences)
        atomic_write(output, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        written = len(sentences)
    return {"kind": kind, "source": str(source), "output": str(output), "read": read,
            "written": written}
