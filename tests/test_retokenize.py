"""retokenize.py: GPT-2 ids to text and to RoBERTa tokens give exactly what the tokenizers give.

decode_captions must equal tokenizer.decode, and roberta_inputs with the rows mapped_rows looks up
from the generator's ids must equal the tokenizer's rows of `decode_captions(ids)` (cut at
max_tokens with "." and </s>, padded), on ShapesWorld's tokenizers and on tokenizers of the
released sizes, for corpus-like captions, random token soup, and both with end tokens and length
cuts. The equality makes the discriminator's inputs, so its logits and rewards, unchanged; a last
test checks the logits themselves, through train.discriminate with dropout on.
"""
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import cgtgan  # noqa: E402
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



def reference_inputs(tokenizer, texts, max_tokens):
    """The discriminator's inputs from text alone: tokenizer rows, cut to max_tokens with "." and
    </s> (the official code's cut), padded with the pad id; (ids, mask)."""
    (dot,) = tokenizer.encode(".", add_special_tokens=False)
    rows = tokenizer(texts)["input_ids"]
    rows = [r if not max_tokens or len(r) <= max_tokens else r[:max_tokens - 2] + [dot, r[-1]]
            for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return ids, mask


def check_tokenizers(gpt2, roberta, corpus, mostly_mapped=True):
    end_id = cgtgan.end_token_id(gpt2, ".")
    for kind, ids, mask in caption_batches(gpt2, roberta, corpus, end_id):
        texts = cgtgan.decode_captions(gpt2, ids, mask, end_id)
        assert texts == reference_decode(gpt2, ids, mask, end_id), kind
        known = retokenize.mapped_rows(roberta, gpt2, ids, mask, end_id)
        assert all(r is None or r == roberta(t)["input_ids"] for r, t in zip(known, texts)), kind
        for max_tokens in (0, 22, 5):
            want = reference_inputs(roberta, texts, max_tokens)
            for rows in (known, None):
                got = cgtgan.roberta_inputs(roberta, texts, max_tokens, rows)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (kind, max_tokens)
        # The table, not the fallback, makes most corpus-like rows (unless RoBERTa's vocabulary
        # lacks words GPT-2's has, as the tiny world's 300-token ones do).
        if kind == "corpus" and mostly_mapped:
            assert sum(r is not None for r in known) > 0.5 * len(known)


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


def test_discriminator_logits_from_mapped_rows_equal_those_from_text(world):
    """gan_step's path (the real sentences' rows looked up in Run.corpus_roberta, the captions'
    mapped from their GPT-2 ids) gives bit for bit the logits of tokenising every text, with the
    discriminator's dropout on (3 groups) and the official 22-token cut."""
    import runs
    import train
    from test_cgtgan import tiny_config

    run = runs.build_run(tiny_config(**{"disc.dropout": 0.3, "disc.max_tokens": 6}), world,
                         with_clip=False)
    run.discriminator.train()
    gpt2, gen = run.gpt2_tokenizer, run.generator
    real_index = torch.arange(6)
    real = [world.corpus[i] for i in real_index.tolist()]
    (_, ids, mask), = [c for c in caption_batches(gpt2, run.roberta_tokenizer, world.corpus,
                                                  gen.end_id, n=9) if c[0] == "corpus"]
    captions = cgtgan.decode_captions(gpt2, ids, mask, gen.end_id)
    known = (train.real_rows(run, real_index)
             + retokenize.mapped_rows(run.roberta_tokenizer, gpt2, ids, mask, gen.end_id))
    assert any(r is not None for r in known[6:])
    group_of_row, seeds = torch.arange(15) % 3, torch.tensor([5, 6, 7])
    fast = train.discriminate(run, real + captions, group_of_row, seeds, known)
    slow = train.discriminate(run, real + captions, group_of_row, seeds)
    assert torch.equal(fast, slow)


def test_bench_paperscale_host_table_runs_on_small_tokenizers(world):
    # bench_paperscale --host-only's two timers, on the tiny world's tokenizers and one repeat:
    # they run the step's own host code (so a change to it that breaks the bench fails here).
    import importlib.util

    import clip_tokenizer

    spec = importlib.util.spec_from_file_location("bench_paperscale",
                                                  ROOT / "bench" / "bench_paperscale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    gpt2 = cgtgan.load_tokenizer(world.gpt2_path, "GPT-2")
    roberta = cgtgan.load_tokenizer(world.roberta_path, "RoBERTa")
    clip_tok = clip_tokenizer.Tokenizer(world.clip_bpe_path) if getattr(world, "clip_bpe_path", None) \
        else clip_tokenizer.Tokenizer()
    host = bench.time_host(gpt2, roberta, clip_tok, list(world.corpus), 2, 2, 8, 2, 1)
    assert host and all(v >= 0 for row in host.values() for v in
                        (row.values() if isinstance(row, dict) else [row]) if isinstance(v, float))
    calls = bench.time_discriminate(gpt2, roberta, list(world.corpus), 2, 2, 8, 2, 1)
    assert calls
