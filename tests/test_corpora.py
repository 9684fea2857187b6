"""The external corpora (corpora.py): each builder on a small file in its public format, written
here (Karpathy split json, Conceptual Captions TSV, ShutterStock text, an image folder); the
official rules sentence by sentence; the `corpus` command's output and one-line errors.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
import config
import corpora
import realdata
from data import DataError

ROOT = Path(__file__).resolve().parents[1]


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def words(n: int, start: str = "w") -> str:
    """n distinct lowercase words: "w0 w1 ..."."""
    return " ".join(f"{start}{i}" for i in range(n))


def test_the_cli_offers_every_builder():
    assert cli.CORPORA == tuple(corpora.SOURCES)


# ----------------------------------------------------------------------------------------------
# COCO and Flickr30k captions: the Karpathy split file's train (+ restval) sentences


def karpathy_file(path: Path, captions: dict[str, list[str]], cocoid: bool = True) -> Path:
    """A Karpathy split file: one image per (split, captions) entry, in the released layout."""
    images = []
    for k, (split, caps) in enumerate(captions.items()):
        entry = {"filename": f"{k}.jpg", "imgid": k, "split": split.split("#")[0],
                 "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": k} for c in caps]}
        if cocoid:
            entry.update(cocoid=100 + k, filepath="train2014")
        images.append(entry)
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def test_caption_sentence_follows_the_official_rule():
    assert corpora.caption_sentence("a dog on a couch.") == "A dog on a couch."
    assert corpora.caption_sentence("A dog on a couch") == "A dog on a couch."
    assert corpora.caption_sentence("two cats sleeping !") == "Two cats sleeping."
    assert corpora.caption_sentence("Is it a cat?!") == "Is it a cat?."  # one mark only
    assert corpora.caption_sentence("a man riding a bike. \n") == "A man riding a bike."
    assert corpora.caption_sentence("dog") == "Dog."  # no length filter
    assert corpora.caption_sentence("  ") is None and corpora.caption_sentence(".") is None


def test_coco_corpus_is_the_train_and_restval_captions(tmp_path):
    split_file = karpathy_file(tmp_path / "dataset_coco.json", {
        "train": ["A man riding a wave on a surfboard.", "a man surfing "],
        "val": ["a val caption"], "test": ["a test caption."],
        "restval": ["Two dogs play in the snow", "two dogs play in the snow"],
        "train#2": ["A man riding a wave on a surfboard."]})
    out = tmp_path / "coco_captions.txt"
    summary = corpora.build("coco", split_file, out)
    assert out.read_text().splitlines() == [
        "A man riding a wave on a surfboard.", "A man surfing.", "Two dogs play in the snow.",
        "Two dogs play in the snow.", "A man riding a wave on a surfboard."]  # duplicates kept
    assert summary == {"kind": "coco", "source": str(split_file), "output": str(out), "read": 5,
                       "written": 5}


def test_flickr30k_corpus_from_its_split_file(tmp_path):
    split_file = karpathy_file(tmp_path / "dataset_flickr30k.json", {
        "train": ["Two young guys with shaggy hair look at their hands .", "A girl ."],
        "test": ["not this one"]}, cocoid=False)
    out = tmp_path / "data" / "flickr30k_captions.txt"
    code, stdout, err = run_cli(["corpus", "flickr30k", str(split_file), str(out)])
    assert code == 0, err
    assert out.read_text() == "Two young guys with shaggy hair look at their hands.\nA girl.\n"
    assert f"flickr30k: 2 captions read from {split_file}; 2 sentences written to {out}" in stdout


@pytest.mark.parametrize("content, words_in_error", [
    ("{not json", "is not valid JSON"),
    ('{"annotations": []}', "has no 'images' list"),
    ('{"images": [{"split": "train"}]}', "image entry 0 lacks a split or sentences[].raw"),
])
def test_a_corrupt_split_file_is_one_line(tmp_path, content, words_in_error):
    split_file = tmp_path / "dataset_coco.json"
    split_file.write_text(content)
    code, out, err = run_cli(["corpus", "coco", str(split_file), str(tmp_path / "out.txt")])
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert str(split_file) in err and words_in_error in err
    assert not (tmp_path / "out.txt").exists()


# ----------------------------------------------------------------------------------------------
# Google Conceptual Captions: caption<TAB>url


def gcc_file(path: Path, captions: list[str]) -> Path:
    path.write_text("".join(f"{c}\thttp://example.com/{k}.jpg\n" for k, c in enumerate(captions)))
    return path


def test_gcc_sentence_follows_the_official_rule():
    assert corpora.gcc_sentence("actor attends the premiere of the new film") == \
        "Actor attends the premiere of the new film."
    # A leading and a trailing punctuation token go; the caption ends at its first "." token.
    assert corpora.gcc_sentence("' a dog runs across the green field today .") == \
        "A dog runs across the green field today."
    assert corpora.gcc_sentence("the cat sat on the warm mat . then it slept for hours") == \
        "The cat sat on the warm mat."
    assert corpora.gcc_sentence("a b c d e f") is None  # 6 words
    assert corpora.gcc_sentence(words(7)) == "W0 w1 w2 w3 w4 w5 w6."
    assert corpora.gcc_sentence(words(15)) is not None
    assert corpora.gcc_sentence(words(20), keep_16_19=lambda: True) is None
    assert corpora.gcc_sentence("") is None and corpora.gcc_sentence(". .") is None


def test_gcc_drops_every_16_to_19_word_caption_as_the_official_code_does():
    # The official loop re-seeds NumPy with 0 before each draw, so each draw is this one:
    assert np.random.RandomState(0).rand() >= 0.3
    for n in range(16, 20):
        assert corpora.gcc_sentence(words(n)) is None
        assert corpora.gcc_sentence(words(n), keep_16_19=lambda: True) is not None


def test_gcc_corpus_file(tmp_path):
    tsv = gcc_file(tmp_path / "Train_GCC-training.tsv", [
        "actor attends the premiere of the new film", words(16), "a b c", words(15, "x"),
        words(20), "the cat sat on the warm mat . then it slept"])
    out = tmp_path / "gcc.txt"
    code, stdout, err = run_cli(["corpus", "gcc", str(tsv), str(out)])
    assert code == 0, err
    assert out.read_text().splitlines() == [
        "Actor attends the premiere of the new film.", corpora.capitalise(words(15, "x")) + ".",
        "The cat sat on the warm mat."]
    assert "gcc: 6 captions read" in stdout and "3 sentences written" in stdout
    # Bytes that are not UTF-8 are dropped, as the official script reads the TSV.
    tsv.write_bytes(b"actor attends the \xffpremiere of the new film\thttp://x\n")
    corpora.build("gcc", tsv, out)
    assert out.read_text() == "Actor attends the premiere of the new film.\n"


def test_gcc_intended_keeps_16_to_19_word_captions_with_p_0_3(tmp_path):
    # Seed 19 draws 0.098, 0.761, 0.247, 0.138: kept, dropped, kept, kept. Only 16-19-word
    # captions draw, so the 8-word one between them does not shift the draws.
    tsv = gcc_file(tmp_path / "gcc.tsv", [words(16, "a"), words(17, "b"), words(8, "c"),
                                          words(18, "d"), words(19, "e")])
    out = tmp_path / "gcc.txt"
    code, _, err = run_cli(["corpus", "gcc", str(tsv), str(out), "--gcc-intended", "--seed", "19"])
    assert code == 0, err
    assert [line.split()[0] for line in out.read_text().splitlines()] == ["A0", "C0", "D0", "E0"]
    many = gcc_file(tmp_path / "many.tsv", [words(16 + k % 4, f"s{k}_") for k in range(2000)])
    read, kept = corpora.corpus_sentences("gcc", many, seed=0, gcc_intended=True)
    assert read == 2000 and abs(len(kept) / 2000 - 0.3) < 0.04


@pytest.mark.parametrize("content, words_in_error", [
    (b"a caption without its url\n", "line 1 has no tab"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\n", "line 1 has no tab"),  # not a TSV at all
    (b"a b\thttp://x\n", "none of its 1 captions survives"),
])
def test_a_corrupt_gcc_file_is_one_line(tmp_path, content, words_in_error):
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_bytes(content)
    code, out, err = run_cli(["corpus", "gcc", str(tsv), str(tmp_path / "gcc.txt")])
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert str(tsv) in err and words_in_error in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------
# ShutterStock: one caption per line


def test_shutterstock_sentence_keeps_the_first_fragment_only():
    def never() -> float:  # a draw that keeps no long fragment
        return 0.99

    assert corpora.shutterstock_sentence(
        "a man in a suit talking on the phone : business concept", never) == \
        "A man in a suit talking on the phone."
    assert corpora.shutterstock_sentence("a b c d e f g . h i j k l m n", never) == \
        "A b c d e f g."
    assert corpora.shutterstock_sentence("young woman - portrait of a happy young woman", never) \
        is None  # the first fragment is too short; the later one is never used
    # > 6 tokens but only 5 words: dropped.
    assert corpora.shutterstock_sentence("a , b , c , d , e", never) is None
    # Leading and trailing punctuation tokens go before splitting.
    assert corpora.shutterstock_sentence("- a cat sleeping on a red sofa today .", never) == \
        "A cat sleeping on a red sofa today."


def test_shutterstock_length_boundaries():
    def draw(u: float):
        return lambda: u

    keep = corpora.shutterstock_sentence
    assert keep("a b c d e f", draw(0.0)) is None  # 6 tokens
    assert keep("a , b , c , d , e f", draw(0.99)) == "A , b , c , d , e f."  # 6 words of 10
    assert keep(words(15), draw(0.99)) is not None  # no draw limit below 16 tokens
    for n, p in ((16, 0.3), (19, 0.3), (20, 0.1), (40, 0.1)):
        assert keep(words(n), draw(p - 1e-9)) is not None and keep(words(n), draw(p)) is None


def test_shutterstock_draws_only_for_eligible_fragments(tmp_path):
    # Seed 19 draws 0.098, 0.761, 0.247, 0.138: a 20-token fragment kept (< 0.1), a 16-token one
    # dropped (>= 0.3), a 17-token one kept (< 0.3), a 21-token one dropped (>= 0.1); the short
    # captions between them draw nothing.
    lines = ["young woman - portrait", words(20, "a"), words(16, "b"), "a , b , c , d , e",
             words(17, "c"), "", words(21, "d"), "a man in a suit talking on the phone : business"]
    source = tmp_path / "shutterstock_captions.txt"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "shutterstock.txt"
    code, stdout, err = run_cli(["corpus", "shutterstock", str(source), str(out), "--seed", "19"])
    assert code == 0, err
    kept = out.read_text().splitlines()
    assert [s.split()[0] for s in kept] == ["A0", "C0", "A"]
    assert kept[-1] == "A man in a suit talking on the phone."
    assert "shutterstock: 7 captions read" in stdout  # the blank line is not a caption
    source.write_bytes(b"a man in a suit\n\xff\xfe talking\n")
    code, _, err = run_cli(["corpus", "shutterstock", str(source), str(tmp_path / "o.txt")])
    assert code == 2 and err.count("\n") == 1 and f"{source}: line 2 is not UTF-8 text" in err
    source.write_text("\n".join(lines) + "\n")
    # Seed 0 (the official): 0.549, 0.715, 0.603, 0.545 keep no long fragment.
    corpora.build("shutterstock", source, out)
    assert out.read_text() == "A man in a suit talking on the phone.\n"


def test_shutterstock_keeps_long_fragments_at_their_rates(tmp_path):
    source = tmp_path / "ss.txt"
    source.write_text("".join(words(16 + k % 2 * 10, f"s{k}_") + "\n" for k in range(4000)))
    _, kept = corpora.corpus_sentences("shutterstock", source, seed=3)
    long_kept = sum(len(s.split()) >= 20 for s in kept) / 2000
    assert abs((len(kept) / 2000 - long_kept) - 0.3) < 0.04 and abs(long_kept - 0.1) < 0.03


# ----------------------------------------------------------------------------------------------
# The ZS-IC image list


def test_web_images_list_every_image_under_the_folder(tmp_path):
    folder = tmp_path / "web"
    for name in ("b.PNG", "a.jpg", "sub/c.jpeg", ".hidden.jpg", ".cache/x.jpg", "sub/deep/d.webp"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(folder / name, format="PNG")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "dataset_web.json"
    code, stdout, err = run_cli(["corpus", "web-images", str(folder), str(out)])
    assert code == 0, err
    assert f"web-images: 4 images under {folder} listed in {out}" in stdout
    listed = json.loads(out.read_text())
    assert [(e.get("filepath"), e["filename"]) for e in listed["images"]] == [
        (None, "a.jpg"), (None, "b.PNG"), ("sub", "c.jpeg"), ("sub/deep", "d.webp")]
    assert {e["split"] for e in listed["images"]} == {"train"}
    # realdata reads it as the zsic preset does: every image is a training image that exists.
    images = realdata.read_karpathy(out, folder)
    assert [im.split for im in images] == ["train"] * 4 and all(im.path.is_file() for im in images)
    assert [im.id for im in images] == ["0", "1", "2", "3"]


def test_web_images_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.jpg").write_bytes(b"")
    for folder, words_in_error in ((tmp_path / "empty", "holds no image files"),
                                   (tmp_path / "nowhere", "does not exist"),
                                   (tmp_path / "file.jpg", "is not a folder")):
        code, out, err = run_cli(["corpus", "web-images", str(folder), str(tmp_path / "w.json")])
        assert code == 2 and err.count("\n") == 1 and str(folder) in err and words_in_error in err


# ----------------------------------------------------------------------------------------------
# The command: the presets read what it writes; errors in one line; a progress bar


def test_the_presets_read_what_corpus_writes(tmp_path):
    tsv = gcc_file(tmp_path / "gcc.tsv", ["actor attends the premiere of the new film",
                                          "a man riding a wave on top of a surfboard"])
    out = tmp_path / "data" / "gcc.txt"
    corpora.build("gcc", tsv, out)
    cfg = config.RealDataConfig(corpus=str(out))
    assert realdata.read_corpus(cfg, []) == realdata.clean_sentences(out.read_text().splitlines(), cfg)
    assert len(realdata.read_corpus(cfg, [])) == 2


def test_missing_input_names_the_file_and_where_it_comes_from(tmp_path):
    for kind in ("coco", "flickr30k", "gcc", "shutterstock"):
        missing = tmp_path / f"{kind}.input"
        code, out, err = run_cli(["corpus", kind, str(missing), str(tmp_path / "o.txt")])
        assert code == 2 and out == "" and err.count("\n") == 1
        assert f"{kind} input {missing} does not exist; it is {corpora.SOURCES[kind]}" in err


def test_bad_arguments_are_one_line(tmp_path):
    source = tmp_path / "ss.txt"
    source.write_text("a man in a suit talking on the phone\n")
    for argv, words_in_error in (
            (["shutterstock", str(source), str(tmp_path / "o.txt"), "--gcc-intended"],
             "--gcc-intended applies to the gcc corpus only"),
            (["shutterstock", str(source), str(source)], "is its input"),
            (["shutterstock", str(source), str(tmp_path)], "is a folder")):
        code, _, err = run_cli(["corpus", *argv])
        assert code == 2 and err.count("\n") == 1 and words_in_error in err, err
    assert source.read_text() == "a man in a suit talking on the phone\n"


def test_a_long_input_shows_a_progress_bar(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(corpora, "PROGRESS_DELAY", 0)
    tsv = gcc_file(tmp_path / "gcc.tsv", ["actor attends the premiere of the new film"] * 50)
    corpora.build("gcc", tsv, tmp_path / "gcc.txt")
    assert "corpus gcc" in capsys.readouterr().err


def test_corpus_as_a_script_fails_in_one_line(tmp_path):
    """`python cgtgan.py corpus ...` in a real process: exit code 2, one line, no traceback."""
    missing = tmp_path / "Train_GCC-training.tsv"
    proc = subprocess.run([sys.executable, "cgtgan.py", "corpus", "gcc", str(missing),
                           str(tmp_path / "gcc.txt")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and str(missing) in proc.stderr, proc.stderr


def test_builders_raise_data_errors(tmp_path):
    with pytest.raises(DataError, match="unknown corpus"):
        corpora.corpus_sentences("wiki", tmp_path / "x.txt")
