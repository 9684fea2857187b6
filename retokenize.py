"""Captions from GPT-2 ids to text and to RoBERTa ids, with little host work per training step.

CgT-GAN (arXiv:2308.12045) trains the generator against a RoBERTa discriminator (Sec. 3.2) on every
caption it samples (Sec. 3.4), so each step turns B*K + B generated token sequences into strings
(for CLIP) and into RoBERTa tokens (for the discriminator). Done on the host, string by string,
that is tens of milliseconds per step during which the GPU waits. Two shortcuts, both exact:

- `token_bytes`: GPT-2's byte-level BPE spells each token as bytes, so a caption's text is the
  UTF-8 decoding of its tokens' bytes joined, which Python does faster than a tokenizer call.
- `IdMap`: GPT-2 and RoBERTa share OpenAI's byte-level BPE, so most caption tokens are RoBERTa
  tokens too. `tokenizer(decode(ids))` equals a lookup of each GPT-2 token's RoBERTa id whenever
  every GPT-2 token is on its own one word of the pre-tokenizer (words are runs of letters, digits
  or other symbols, with at most one leading space) and that word is one RoBERTa token. The table
  says which tokens qualify; a row where all do is mapped by `mapped_rows` (a few tensor ops over
  the whole batch), any other row is tokenised from its text as before (cgtgan.roberta_inputs).

Shape legend: N captions, T GPT-2 tokens, V GPT-2 vocabulary.
"""
from __future__ import annotations

import unicodedata
from functools import lru_cache

import torch

from clip_tokenizer import bytes_to_unicode

# Character classes of the byte-level pre-tokenizer's words: letters, numbers, anything else.
LETTER, NUMBER, OTHER = 0, 1, 2


@lru_cache(maxsize=4)
def token_bytes(tokenizer) -> list[bytes | None] | None:
    """Each token id's bytes, or None for added tokens (their text is not byte-level); None for a
    tokenizer whose decoder is not byte-level. Built once per tokenizer."""
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.decoder, decoders.ByteLevel):
        return None
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    added = set(tokenizer.added_tokens_decoder)
    out = []
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        ok = i not in added and token is not None and all(c in byte_of for c in token)
        out.append(bytes(byte_of[c] for c in token) if ok else None)
    return out


def decode_row(tokenizer, row: list[int]) -> str:
    """tokenizer.decode(row, clean_up_tokenization_spaces=False), from the bytes table when the
    row is plain byte-level BPE that decodes as UTF-8 (else by the tokenizer)."""
    table = token_bytes(tokenizer)
    if table is not None:
        parts = [table[i] for i in row]
        if None not in parts:
            try:
                return b"".join(parts).decode("utf-8")
            except UnicodeDecodeError:
                pass
    return tokenizer.decode(row, clean_up_tokenization_spaces=False)


def char_class(c: str) -> int | None:
    """LETTER, NUMBER or OTHER as the pre-tokenizer's regex sees c; None for whitespace, control,
    format and combining characters, which the table leaves to the tokenizer."""
    category = unicodedata.category(c)
    if c.isspace() or category[0] in "ZCM":
        return None
    return {"L": LETTER, "N": NUMBER}.get(category[0], OTHER)


def word_parts(text: str, specials: str) -> tuple[bool, int, int] | None:
    """(leading space, class of the first and of the last character after it) of a token's text,
    else None: empty, inner spaces, the lone apostrophe (it starts "'s" with the next token), or a
    character that starts one of the target's added tokens (matched across words)."""
    space = text.startswith(" ")
    body = text[1:] if space else text
    classes = [char_class(c) for c in body]
    if not body or None in classes or body == "'" or any(c in specials for c in body):
        return None
    return space, classes[0], classes[-1]


class IdMap:
    """GPT-2 caption ids (N, T) -> the RoBERTa tokens of their decoded text.

    Tables over the GPT-2 vocabulary (V,): `first` and `rest`, each token's RoBERTa id as a
    caption's first token (decode_captions strips its leading space) and after it, -1 where the
    text is not one RoBERTa token; `space`, `head` and `tail`, the leading space and the classes
    of the first and last character. Two tokens stay apart words when the second starts with a
    space or the classes differ ("Ġred" "," yes; "Ġsmall" "er" no: one word "Ġsmaller").
    Example: " a", " red", " circle" -> <s> "a" "Ġred" "Ġcircle" </s>, with no string in between.
    """

    def __init__(self, source, target):
        table = token_bytes(source)
        specials = "".join(t.content[0] for t in target.added_tokens_decoder.values() if t.content)
        texts = []
        for piece in table or []:
            try:
                texts.append(None if piece is None else piece.decode("utf-8"))
            except UnicodeDecodeError:  # part of a character: left to the tokenizer
                texts.append(None)
        parts = [None if t is None else word_parts(t, specials) for t in texts]
        words = [i for i, p in enumerate(parts) if p is not None]
        rest = target([texts[i] for i in words], add_special_tokens=False)["input_ids"]
        first = target([texts[i].lstrip(" ") for i in words], add_special_tokens=False)["input_ids"]
        v = len(texts)
        self.first, self.rest = torch.full((v,), -1), torch.full((v,), -1)
        self.space = torch.zeros(v, dtype=torch.bool)
        self.head, self.tail = torch.full((v,), -1), torch.full((v,), -2)
        for i, a, b in zip(words, first, rest):
            self.first[i], self.rest[i] = (a[0] if len(a) == 1 else -1), (b[0] if len(b) == 1 else -1)
            self.space[i], self.head[i], self.tail[i] = parts[i]
        # What the tokenizer wraps a text in (<s> ... </s> for RoBERTa's released tokenizer; a
        # tokenizer built without a post-processor adds nothing), read from the tokenizer itself.
        plain, full = (target("a", add_special_tokens=False)["input_ids"],
                       target("a")["input_ids"])
        at = next((k for k in range(len(full)) if full[k:k + len(plain)] == plain), None)
        self.wraps = at is not None and len(plain) > 0
        self.prefix, self.suffix = (full[:at], full[at + len(plain):]) if self.wraps else ([], [])

    def __call__(self, ids: torch.Tensor, length: torch.Tensor):
        """ids (N, T) with caption lengths (N,) (no end token) -> (mapped, ok): RoBERTa ids (N, T)
        of each token, and (N,) whether the row's tokens are exactly tokenizer(decode(row))."""
        t = torch.arange(ids.shape[1], device=ids.device)
        inside = t < length[:, None]  # (N, T)
        mapped = torch.where(t == 0, lookup(self.first, ids), lookup(self.rest, ids))  # (N, T)
        after, before = ids[:, 1:], ids[:, :-1]  # (N, T-1) each
        apart = lookup(self.space, after) | (lookup(self.tail, before) != lookup(self.head, after))
        ok = ((mapped >= 0) | ~inside).all(1) & (apart | ~inside[:, 1:]).all(1)  # (N,)
        return mapped, ok


def lookup(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[ids] for a table (V,) and ids of any shape. A gather: indexing runs a CPU thread pool
    for a few thousand ids, milliseconds on a busy machine instead of microseconds."""
    return table.gather(0, ids.reshape(-1)).view(ids.shape)


@lru_cache(maxsize=2)
def id_map(source, target) -> IdMap:
    """The IdMap of two tokenizers, built once (about a second for GPT-2's 50,257 tokens)."""
    return IdMap(source, target)


def mapped_rows(target, source, ids: torch.Tensor, mask: torch.Tensor,
                end_id: int) -> list[list[int] | None]:
    """The target (RoBERTa) tokenizer's ids of each caption, <s> ... </s> (the special tokens the
    tokenizer adds to a text, read from it), looked up from the source (GPT-2) ids (N, T) with
    mask (N, T) that decode_captions turns into text: for each row
    the IdMap maps exactly, the list `target(text)["input_ids"]` holds; None for the others (and
    for every row when the source is not byte-level), which the caller tokenises from text.
    Tensors on the CPU: the lists are built on the host anyway.
    Example: " a", " red", " circle", "." -> [<s>, "a", "Ġred", "Ġcircle", </s>].
    """
    if token_bytes(source) is None:
        return [None] * ids.shape[0]
    n = mask.sum(-1).long()  # (N,) tokens with the end token
    last = ids.gather(1, (n - 1).clamp_min(0)[:, None]).squeeze(1)  # (N,)
    length = n - ((n > 0) & (last == end_id)).long()  # (N,) caption tokens, as decode_captions
    table = id_map(source, target)
    if not table.wraps:  # a tokenizer whose special tokens cannot be read off: text for all
        return [None] * ids.shape[0]
    mapped, ok = table(ids, length)  # (N, T), (N,)
    return [table.prefix + row[:k] + table.suffix if good else None
            for row, k, good in zip(mapped.tolist(), length.tolist(), ok.tolist())]
