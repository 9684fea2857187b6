"""CLIP's tokenizer, written out: captions -> byte-level BPE ids -> (N, L) token tensors.

CgT-GAN (arXiv:2308.12045, Sec. 3.3) rewards each generated caption through its CLIP text
embedding: compared with the image's embedding (CLIP-cos reward) or with the image's aggregated
corpus embedding (CLIP-agg reward); the corpus sentences are embedded the same way. Before CLIP's
text encoder (clip_model.CLIP.encode_text) sees a caption, this file turns it into token ids exactly
as OpenAI's simple_tokenizer.py does (Radford et al. 2021; github.com/openai/CLIP,
clip/simple_tokenizer.py): ftfy and HTML clean-up, a regex pre-tokenizer, bytes mapped to printable
unicode symbols, then the BPE merges of a merges file. `tokenize` adds the start and end tokens and
zero-pads to the context length, as OpenAI's clip.tokenize does. ShapesWorld's short merges files
load the same way and give a smaller vocabulary.

Shape legend: N texts, L context length (tokens).

Sections: text to byte symbols; merges files; the tokenizer and its merge loop; batches of token ids.
"""
import gzip
import html
import importlib.util
import math
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch

from clip_model import default_cache_dir, download
from data import atomic_write

# ---------------------------------------------------------------------------------------------------
# Text to byte symbols: constants, the byte-to-unicode map, text clean-up

BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_URL = f"https://github.com/openai/CLIP/raw/main/clip/{BPE_FILENAME}"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
# OpenAI's vocabulary is 49152 ids: 512 byte symbols, 48894 merges, 2 special tokens. The standard
# merges file holds more merges than that; only the first 48894 are used.
MAX_MERGES = 49152 - 256 - 2
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer: special tokens, English contractions, letter runs, single digits, symbol runs.
_WORDS = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
                       r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)


@lru_cache()
def bytes_to_unicode() -> dict:
    """A reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the other 68 (controls, space, ...) map to
    chr(256), chr(257), ... in byte order, so BPE never sees whitespace or control characters.
    Example: b" " (32) -> "Ġ" (chr(256 + 32)), b"a" -> "a".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def clean_text(text: str) -> str:
    """ftfy repair, HTML unescaped twice (captions scraped from the web are often double-escaped),
    runs of whitespace collapsed to one space, lowercased.

    Printable ASCII without "&" (every caption the generator writes in English) is a text ftfy and
    HTML unescaping leave as it is, so it skips them: a tenth of the time, on the reward's path.
    """
    if text.isascii() and text.isprintable() and "&" not in text:
        return " ".join(text.split()).lower()
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


# ---------------------------------------------------------------------------------------------------
# Merges files: reading, writing, finding (or downloading) OpenAI's


def read_merges(path) -> list:
    """The merges of a CLIP-format BPE file (.txt or .txt.gz): one header line, then "a b" lines."""
    path = Path(path)
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        lines = raw.decode("utf-8").split("\n")[1:]
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read BPE merges ({e}); expected a CLIP merges .txt or .txt.gz") from None
    merges = []
    for number, line in enumerate(lines[:MAX_MERGES], start=2):
        if not line.strip():
            continue
        pair = tuple(line.split())
        if len(pair) != 2:
            raise ValueError(f"{path}:{number}: a merge line needs two symbols, got {line[:40]!r}")
        merges.append(pair)
    return merges


def write_merges(path, merges):
    """Writes merges [(a, b), ...] in CLIP's format (gzip when path ends in .gz), atomically."""
    path = Path(path)
    content = ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode("utf-8")
    raw = gzip.compress(content, mtime=0) if path.suffix == ".gz" else content
    atomic_write(path, lambda tmp: tmp.write_bytes(raw))


def find_bpe(bpe_path=None, cache_dir=None) -> Path:
    """The standard merges file: bpe_path if given, else the cache directory, else a copy inside an
    installed open_clip_torch or clip-anytorch (found without importing them), else a download."""
    if bpe_path is not None:
        if not Path(bpe_path).is_file():
            raise FileNotFoundError(f"{bpe_path}: no such BPE merges file")
        return Path(bpe_path)
    cached = Path(cache_dir or default_cache_dir()) / BPE_FILENAME
    if cached.is_file():
        return cached
    for package in ("open_clip", "clip"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:
            candidate = Path(spec.origin).parent / BPE_FILENAME
            if candidate.is_file():
                return candidate
    return download(BPE_URL, cached, BPE_SHA256)


# ---------------------------------------------------------------------------------------------------
# The tokenizer (OpenAI's simple_tokenizer.py, rewritten) and its merge loop


class Tokenizer:
    """CLIP's byte-level BPE. Vocabulary: 256 byte symbols, the same 256 ending a word ("</w>"),
    one symbol per merge, then <|startoftext|> and <|endoftext|> (so the end token has the largest id).

    Example (standard file): "a photo of a dog" -> [320, 1125, 539, 320, 1929].
    """

    def __init__(self, bpe_path=None, cache_dir=None):
        merges = read_merges(find_bpe(bpe_path, cache_dir))
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {s: i for i, s in enumerate(vocab)}
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {SOT: [SOT], EOT: [EOT]}
        self.word_ids: dict[str, list] = {}  # word -> its ids: encode's lookups, once per word
        self.sot_token, self.eot_token = self.encoder[SOT], self.encoder[EOT]
        self.vocab_size = len(vocab)

    def encode(self, text: str) -> list:
        """Text -> BPE ids, without start and end tokens."""
        ids = []
        for word in _WORDS.findall(clean_text(text)):
            if word not in self.word_ids:
                symbols = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                self.word_ids[word] = [self.encoder[s] for s in self.bpe(symbols)]
            ids += self.word_ids[word]
        return ids

    def decode(self, ids) -> str:
        """BPE ids -> text; word ends become spaces."""
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def bpe(self, word: str) -> list:
        """bpe(word, self.ranks), remembered per word."""
        if word not in self.cache:
            self.cache[word] = bpe(word, self.ranks)
        return self.cache[word]


# exercise: bpe (docs/exercises.md)
def bpe(word: str, ranks: dict) -> list:
    """The BPE merge loop on one word: merge the lowest-ranked adjacent pair, everywhere it occurs
    left to right, until no adjacent pair is ranked. The last symbol carries the word end "</w>".

    Example: "low" starts as ["l", "o", "w</w>"]; with ranks {("l", "o"): 0, ("lo", "w</w>"): 1}
    it becomes ["lo", "w</w>"], then ["low</w>"].
    """
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        best = min(zip(parts, parts[1:]), key=lambda pair: ranks.get(pair, math.inf))
        if best not in ranks:
            break
        parts = merge_pair(parts, best)
    return parts


def merge_pair(symbols, pair: tuple) -> list:
    """Every left-to-right, non-overlapping occurrence of `pair` in `symbols` joined into one symbol.

    Example: merge_pair(["l", "o", "l", "o"], ("l", "o")) -> ["lo", "lo"].
    """
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


# ---------------------------------------------------------------------------------------------------
# Batches of token ids for CLIP's text encoder


@lru_cache()
def default_tokenizer() -> Tokenizer:
    return Tokenizer()


def tokenize(texts, context_length: int = 77, truncate: bool = False, tokenizer: Tokenizer = None):
    """Texts -> LongTensor (N, L): <|startoftext|> ids <|endoftext|>, zero-padded to context_length.

    Text that does not fit raises a ValueError naming it, unless truncate=True, which cuts it and
    puts the end token last (as OpenAI's clip.tokenize does).
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    tokenizer = tokenizer or default_tokenizer()
    rows = []
    for text in texts:
        ids = [tokenizer.sot_token, *tokenizer.encode(text), tokenizer.eot_token]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"text too long for context length {context_length} ({len(ids)} tokens): "
                                 f"{text[:60]!r}{'...' if len(text) > 60 else ''}; shorten it or pass truncate=True")
            ids = ids[:context_length]
            ids[-1] = tokenizer.eot_token
        rows.append(ids)
    # The ids go into one tensor at once: a copy per row would take longer than the BPE.
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)  # (N,)
    used = torch.arange(context_length)[None] < lengths[:, None]  # (N, L)
    out = torch.zeros(len(texts), context_length, dtype=torch.long)  # (N, L)
    out[used] = torch.tensor([i for r in rows for i in r], dtype=torch.long)
    return out
