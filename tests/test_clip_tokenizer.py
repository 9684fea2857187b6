"""clip_tokenizer.Tokenizer against OpenAI's reference tokenizer, and the merges-file lookup and download.

The reference is simple_tokenizer.py from the clip-anytorch package, loaded by path (it imports only
ftfy, regex, html and gzip), with the vocabulary file shipped beside it.
"""
import gzip
import importlib.util
import io
import random
import urllib.request
from pathlib import Path

import pytest
import torch

import clip_tokenizer
from clip_tokenizer import BPE_FILENAME, Tokenizer, tokenize, write_merges


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference_module(openai_clip_file):
    return openai_clip_file("simple_tokenizer.py")


@pytest.fixture(scope="module")
def standard_bpe(reference_module):
    return Path(reference_module.default_bpe())


WORDS = ("a the photo of dog cat man woman riding horse beach sunset red blue small large two people "
         "standing next to table with pizza on it skateboarder doing trick ramp giraffes eating leaves "
         "isn't it's we'll they're you've I'm he'd").split()
UNICODE = ["café", "naïve", "Straße", "東京タワー", "北京", "Москва", "مرحبا", "नमस्ते", "ἀλήθεια", "ﬁancé",
           "e\u0301", "Ωmega", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "ｆｕｌｌｗｉｄｔｈ", "½", "²³", "٣٤٥", "ℌ𝔢𝔩𝔩𝔬"]
EMOJI = ["😀", "🐶🐱", "👍🏽", "👨‍👩‍👧‍👦", "🇯🇵", "❤️", "🏳️‍🌈", "✈", "☕️"]
ENTITIES = ["&amp;", "&lt;b&gt;", "&#39;", "&quot;", "&amp;amp;", "&nbsp;", "&#x1F600;", "&eacute;", "&copy;",
            "&amp;lt;", "&#8212;"]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u2009", "\u3000", "\u200b", "\u2028", " \t \n "]
NUMBERS = ["3.14", "1,000,000", "2023-11-29", "12345678901234567890", "0", "-7", "1e10", "#42", "$9.99", "50%"]
ODD = ["<|startoftext|>", "<|endoftext|>", "cafÃ©", "â€œquotedâ€\x9d", "DON'T", "'S", "...", "?!?!", "a-b_c",
       "http://example.com/a?b=c", "C++", "@user", "(x)", "\x00", "\x1b[0m", "~~~", "ALL CAPS TEXT"]


def random_strings(n, seed=0):
    rng = random.Random(seed)
    pools = [WORDS, UNICODE, EMOJI, ENTITIES, NUMBERS, ODD]
    strings = []
    for i in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            pool = WORDS if rng.random() < 0.5 else rng.choice(pools)
            parts.append(rng.choice(pool))
            if rng.random() < 0.2:
                parts.append(chr(rng.choice([rng.randint(0x20, 0x2FF), rng.randint(0x370, 0x4FF),
                                             rng.randint(0x3040, 0x30FF), rng.randint(0x1F300, 0x1FAFF)])))
            parts.append(rng.choice(SPACES) if rng.random() < 0.3 else " ")
        text = "".join(parts)
        if i % 5 == 0:
            text = text.upper() if i % 2 else text.title()
        strings.append(text)
    # Very long texts: thousands of words.
    strings += [" ".join(rng.choice(WORDS + UNICODE + EMOJI) for _ in range(3000)) for _ in range(3)]
    strings += ["", " ", "\n\t", "a", "&", "😀" * 200, "9" * 500]
    return strings


def test_parity_with_openai_tokenizer(reference_module, standard_bpe):
    reference = reference_module.SimpleTokenizer(str(standard_bpe))
    ours = Tokenizer(standard_bpe)
    texts = random_strings(2200)
    assert len(texts) >= 2000 and ours.vocab_size == 49408
    mismatches = [t for t in texts if ours.encode(t) != reference.encode(t)]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]!r}"
    for text in texts[:300]:
        ids = reference.encode(text)
        assert ours.decode(ids) == reference.decode(ids)
    specials = reference.encoder["<|startoftext|>"], reference.encoder["<|endoftext|>"]
    assert (ours.sot_token, ours.eot_token) == specials


def test_short_merges_file(tmp_path, reference_module):
    # A ShapesWorld-style file: a handful of merges give 512 + len(merges) + 2 ids.
    merges = [("r", "e"), ("d", "</w>"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("l", "e</w>"), ("s", "q")]
    path = tmp_path / "merges.txt.gz"
    write_merges(path, merges)
    ours = Tokenizer(path)
    assert ours.vocab_size == 512 + len(merges) + 2 and ours.eot_token == ours.vocab_size - 1
    reference = reference_module.SimpleTokenizer(str(path))
    for text in ["red circle", "a red square", "circle circle red", "SQUARE!"]:
        assert ours.encode(text) == reference.encode(text)
    # Decoding turns each word end into a space, so "square!" comes back as "square ! ".
    assert ours.decode(ours.encode("A red  circle")) == "a red circle "
    assert ours.encode("red") == [512 + 2]
    plain = tmp_path / "merges.txt"
    write_merges(plain, merges)
    assert Tokenizer(plain).encoder == ours.encoder


def test_malformed_merges_file(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("#version: 0.2\na b\nthree symbols here\n")
    with pytest.raises(ValueError, match=r"bad.txt:3: a merge line needs two symbols"):
        Tokenizer(path)


def test_tokenize_too_long_and_truncate():
    text = "a photo of " * 40 + "a dog"
    with pytest.raises(ValueError, match=r"text too long for context length 77 .*'a photo of a photo"):
        tokenize([text])
    out = tokenize([text, "a dog"], truncate=True)
    tok = clip_tokenizer.default_tokenizer()
    assert out.shape == (2, 77) and out[0, -1] == tok.eot_token and out[0, 0] == tok.sot_token
    assert out[0, 1:-1].tolist() == tok.encode(text)[:75]


def test_tokenize_shapes_and_end_token():
    out = tokenize(["a photo of a dog", "a cat"], context_length=10)
    tok = clip_tokenizer.default_tokenizer()
    assert out.shape == (2, 10) and out.dtype == torch.long
    assert out[0, :7].tolist() == [tok.sot_token, 320, 1125, 539, 320, 1929, tok.eot_token]
    assert out.argmax(-1).tolist() == [6, 3]


# --------------------------------------------------------------------------------------------------
# Finding the standard merges file


class FakeResponse(io.BytesIO):
    def __init__(self, data):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_lookup_order(tmp_path, monkeypatch, standard_bpe):
    monkeypatch.delenv("CGTGAN_CACHE", raising=False)
    with pytest.raises(FileNotFoundError, match="nowhere.txt.gz: no such BPE merges file"):
        Tokenizer(tmp_path / "nowhere.txt.gz")
    # The cache directory comes before an installed package's copy.
    write_merges(tmp_path / BPE_FILENAME, [("a", "b")])
    assert clip_tokenizer.find_bpe(cache_dir=tmp_path) == tmp_path / BPE_FILENAME
    assert Tokenizer(cache_dir=tmp_path).vocab_size == 515
    monkeypatch.setenv("CGTGAN_CACHE", str(tmp_path))
    assert clip_tokenizer.find_bpe() == tmp_path / BPE_FILENAME
    # With an empty cache, the installed package's copy is used.
    assert clip_tokenizer.find_bpe(cache_dir=tmp_path / "empty") == standard_bpe


def test_download_verified_and_offline(tmp_path, monkeypatch, standard_bpe):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.delenv("CGTGAN_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    good = standard_bpe.read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(good))
    path = clip_tokenizer.find_bpe(cache_dir=tmp_path / "a")
    assert path == tmp_path / "a" / BPE_FILENAME and path.read_bytes() == good

    # A truncated download fails its checksum: nothing is left behind.
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(good[:1000]))
    with pytest.raises(RuntimeError, match="failed its SHA-256 check"):
        clip_tokenizer.find_bpe(cache_dir=tmp_path / "b")
    assert list((tmp_path / "b").iterdir()) == []

    def offline(url, timeout=None):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match=f"put a copy at {tmp_path / 'c' / BPE_FILENAME}"):
        clip_tokenizer.find_bpe(cache_dir=tmp_path / "c")
    monkeypatch.setenv("CGTGAN_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="downloads are off"):
        clip_tokenizer.find_bpe(cache_dir=tmp_path / "d")
    assert gzip.decompress(good).startswith(b'"bpe_simple_vocab_16e6.txt#version')


def test_clean_text_shortcut_equals_the_full_repair():
    """Printable ASCII without "&" skips ftfy and HTML unescaping: the same text as the full path."""
    import html
    import random

    import ftfy
    import regex

    def full(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return regex.sub(r"\s+", " ", text).strip().lower()

    rng = random.Random(0)
    alphabet = "".join(chr(c) for c in range(32, 127) if chr(c) != "&")
    texts = ["A Red  Circle above a blue square.", "  spaced  out  ", "it's \"quoted\" -- ok;"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    for text in texts:
        assert clip_tokenizer.clean_text(text) == full(text), repr(text)
    # Text outside the shortcut still gets the repair: entities and mojibake.
    assert clip_tokenizer.clean_text("fish &amp; chips") == "fish & chips"
    assert clip_tokenizer.clean_text("caf\u00c3\u00a9") == "caf\u00e9"
