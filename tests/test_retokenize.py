"""retokenize.py: GPT-2 ids to text and to RoBERTa tokens give exactly what the tokenizers give.

decode_captions must equal tokenizer.decode, and roberta_tokens from the generator's ids must equal
`tokenizer(decode_captions(ids), padding=True)` (cut to max_len), on ShapesWorld's tokenizers and on
tokenizers of the released sizes, for corpus-like captions, random token soup, and both with end
tokens and length cuts. The equality makes the discriminator's inputs, so its rewards, unchanged.
"""
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import cgtgan  # noqa: E402
import clip_tokenizer  # noqa: E402
import retokenize  # noqa: E402
from fixtures import full_size_bpe  # noqa: E402
from test_cgtgan import sentences, world  # noqa: E402,F401 (world: a fixture)


def reference_decode(tokenizer, ids, mask, end_id):
    """decode_captions as it was: the tokenizer's decode of each row."""
    out = []
    for row, n in zip(ids.tolist(), mask.sum(-1).long().tolist()):
        row = row[:n][:-1] if n and row[n - 1] == end_id else row[:n]
        out.append(" ".join(tokenizer.decode(row, clean_up_tokenization_spaces=False).split()))
    return out


def caption_batches(gpt2, roberta, corpus, end_id, seed=0, n=96, t=12):
    """(ids, mask) batches: corpus sentences (ended or cut at t), random tokens, random tokens
    from the table's mappable ones; rows stop at random lengths, a third with the end token."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    table = retokenize.id_map(gpt2, roberta)
    mappable = torch.nonzero(table.rest >= 0).squeeze(1)
    picked = [rng.choice(corpus) for _ in range(n)]
    rows = [r[:t - 1] + [end_id] for r in gpt2(picked, add_special_tokens=False)["input_ids"]]
    corpus_ids = torch.full((n, t), end_id)
    for i, r in enumerate(rows):
        corpus_ids[i, :len(r)] = torch.tensor(r)
    corpus_mask = (torch.arange(t) < torch.tensor([len(r) for r in rows])[:, None]).float()
    yield "corpus", corpus_ids, corpus_mask
    # Mostly mappable rows with a few the tokenizer makes: both halves of roberta_tokens at once.
    mixed = corpus_ids.clone()
    mixed[::4] = torch.randint(len(gpt2), (len(mixed[::4]), t), generator=g)
    yield "mixed", mixed, corpus_mask
    for kind in ("random", "mappable"):
        ids = (torch.randint(len(gpt2), (n, t), generator=g) if kind == "random"
               else mappable[torch.randint(len(mappable), (n, t), generator=g)])
        length = torch.randint(1, t + 1, (n,), generator=g)
        ids[torch.arange(0, n, 3), length[::3] - 1] = end_id
        yield kind, ids, (torch.arange(t) < length[:, None]).float()



def check_tokenizers(gpt2, roberta, corpus, mostly_mapped=True):
    end_id = cgtgan.end_token_id(gpt2, ".")
    for kind, ids, mask in caption_batches(gpt2, roberta, corpus, end_id):
        texts = cgtgan.decode_captions(gpt2, ids, mask, end_id)
        assert texts == reference_decode(gpt2, ids, mask, end_id), kind
        for max_len in (None, 22, 5):
            got = retokenize.roberta_tokens(roberta, texts, "cpu", max_len, (gpt2, ids, mask, end_id))
            cut = {"truncation": True, "max_length": max_len} if max_len else {}
            want = roberta(texts, padding=True, return_tensors="pt", **cut)
            assert torch.equal(got[0], want["input_ids"]), (kind, max_len)
            assert torch.equal(got[1], want["attention_mask"]), (kind, max_len)
        # The table, not the fallback, makes most corpus-like rows (unless RoBERTa's vocabulary
        # lacks words GPT-2's has, as the tiny world's 300-token ones do).
        if kind == "corpus" and mostly_mapped:
            length = mask.sum(-1).long() - 1
            assert retokenize.id_map(gpt2, roberta)(ids, length)[1].float().mean() > 0.5


def test_roberta_ids_from_gpt2_ids_on_shapesworld_tokenizers(tmp_path):
    import shapesworld
    from config import ShapesWorldConfig

    corpus = sentences(200, seed=3)
    vocab = ShapesWorldConfig().bpe_vocab_size
    shapesworld.train_hf_tokenizer(corpus, "gpt2", vocab, tmp_path / "gpt2")
    shapesworld.train_hf_tokenizer(corpus, "roberta", vocab, tmp_path / "roberta")
    check_tokenizers(cgtgan.load_tokenizer(tmp_path / "gpt2", "GPT-2"),
                     cgtgan.load_tokenizer(tmp_path / "roberta", "RoBERTa"), corpus)


def test_roberta_ids_from_gpt2_ids_on_tiny_world_tokenizers(world):
    check_tokenizers(cgtgan.load_tokenizer(world.gpt2_path, "GPT-2"),
                     cgtgan.load_tokenizer(world.roberta_path, "RoBERTa"), world.corpus,
                     mostly_mapped=False)


def test_roberta_ids_from_gpt2_ids_at_the_released_sizes():
    from transformers import GPT2TokenizerFast, RobertaTokenizerFast

    corpus = [s.capitalize() + "." for s in sentences(300, seed=4)] + ["A man's 2 dogs , 10 cats!"]
    gpt2 = GPT2TokenizerFast(tokenizer_object=full_size_bpe(50257, [], ["<|endoftext|>"], corpus),
                             bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                             unk_token="<|endoftext|>")
    roberta = RobertaTokenizerFast(
        tokenizer_object=full_size_bpe(50265, ["<s>", "<pad>", "</s>", "<unk>"], ["<mask>"], corpus),
        bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>",
        pad_token="<pad>", mask_token="<mask>")
    check_tokenizers(gpt2, roberta, corpus)


@pytest.mark.parametrize("text", ["a red circle", "  Two  DOGS ; a &amp; b", "x\ty", "café au lait",
                                  "<b>&lt;hi&gt;</b>", "", "don't 'quote' \"this\""])
def test_clean_text_fast_path_equals_ftfy(text):
    import html

    import ftfy
    import regex

    slow = regex.sub(r"\s+", " ", html.unescape(html.unescape(ftfy.fix_text(text))).strip())
    assert clip_tokenizer.clean_text(text) == slow.strip().lower()
