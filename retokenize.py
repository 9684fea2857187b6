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
  says which tokens qualify; a row where all do is mapped on the device, any other row is
  tokenised from its text as before.

Shape legend: N captions, T GPT-2 tokens, S RoBERTa tokens (with <s> and </s>), V GPT-2 vocabulary.
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
    """GPT-2 caption ids (N, T) -> the RoBERTa tokens of their decoded text, on the device.

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
        self.bos, self.eos, self.pad = target.bos_token_id, target.eos_token_id, target.pad_token_id

    def to(self, device) -> "IdMap":
        for name in ("first", "rest", "space", "head", "tail"):
            setattr(self, name, getattr(self, name).to(device))
        return self

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


def roberta_tokens(tokenizer, texts: list[str], device, max_len: int | None = None, source=None):
    """tokenizer(texts, padding=True) (cut to max_len tokens when given) -> (input_ids (N, S),
    attention_mask (N, S)) on device.

    source (gpt2_tokenizer, ids (N, T), mask (N, T), end_id): the generator's tokens the texts were
    decoded from by decode_captions. Rows the IdMap maps are then built on the device (<s>, the
    looked-up ids, </s>, padding); only the others are tokenised from their text.
    """
    cut = {"truncation": True, "max_length": max_len} if max_len else {}
    mapped = None if source is None or token_bytes(source[0]) is None else _map_rows(tokenizer, *source)
    # Mostly unmappable rows (a random model's token soup): one call of the tokenizer is quicker.
    if mapped is None or 2 * int(mapped[1].sum()) < len(texts):
        tokens = tokenizer(texts, padding=True, return_tensors="pt", **cut).to(device)
        return tokens["input_ids"], tokens["attention_mask"]
    ids, (mapped, ok, length) = source[1], mapped
    keep = length.clamp_max(max_len - 2) if max_len else length  # (N,) without <s> and </s>
    ok_rows, keep_rows = ok.tolist(), keep.tolist()
    slow = [i for i, good in enumerate(ok_rows) if not good]
    slow_ids = tokenizer([texts[i] for i in slow], **cut)["input_ids"] if slow else []
    width = max([k + 2 for k, good in zip(keep_rows, ok_rows) if good] + [len(r) for r in slow_ids])
    grid = torch.arange(width, device=ids.device)[None]  # (1, S)
    body = mapped.gather(1, (grid - 1).clamp(0, ids.shape[1] - 1).expand(len(texts), -1))  # (N, S)
    k = keep[:, None]  # (N, 1)
    out = torch.where(grid == 0, tokenizer.bos_token_id, torch.where(grid <= k, body, torch.where(
        grid == k + 1, tokenizer.eos_token_id, tokenizer.pad_token_id)))  # (N, S)
    attention = (grid <= k + 1).long()  # (N, S)
    if slow:  # the tokenizer's rows, padded to the common width and put in place at once
        rows = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in slow_ids])
        marks = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in slow_ids])
        index = torch.tensor(slow, device=ids.device)
        out[index], attention[index] = rows.to(ids.device), marks.to(ids.device)
    return out.to(device), attention.to(device)


def _map_rows(tokenizer, gpt2, ids: torch.Tensor, mask: torch.Tensor, end_id: int):
    """IdMap of the rows (decode_captions' lengths: the end token dropped) -> (mapped (N, T),
    ok (N,), caption lengths (N,))."""
    n = mask.sum(-1).long()  # (N,) tokens with the end token
    last = ids.gather(1, (n - 1).clamp_min(0)[:, None]).squeeze(1)  # (N,)
    length = n - ((n > 0) & (last == end_id)).long()  # (N,) caption tokens
    return *id_map(gpt2, tokenizer).to(ids.device)(ids, length), length
