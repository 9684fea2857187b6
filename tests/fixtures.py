"""A paper-scale dataset in miniature, in exactly the real formats, built offline in seconds.

`build_paperscale_fixture(root)` writes:
  coco/train2014/*.jpg, coco/val2014/*.jpg   a dozen small drawn images (COCO's folder layout)
  dataset_coco.json                          a Karpathy split file (train, restval, val, test)
  corpus.txt                                 an external corpus, one sentence per line (with the
                                             blank lines, duplicates and odd casing real ones have)
  flickr30k/*.jpg, dataset_flickr30k.json    a second dataset in Flickr30k's layout (no filepath,
                                             no cocoid), the target of zero-shot (ZS-IC) evaluation
  web/*.jpg, dataset_web.json                "web" images listed as train only, without captions:
                                             ZS-IC training images
  gpt2/, roberta/                            random-weight GPT2LMHeadModel / RobertaModel saved with
                                             save_pretrained, with byte-level BPE tokenizers
                                             trained on the fixture's sentences
  clip.pt, clip_bpe.txt                      a random-weight CLIP state dict with OpenAI's key names
                                             (clip_model.save) and a CLIP-format merges file

The paper-scale code paths (realdata.prepare, the CLI's prepare/init/train/eval) run on it
unchanged: `fixture.config()` gives the RealDataConfig. `n_train` adds that many training images
(a batch of 64 at the paper's size) after the default ones, which it leaves exactly as they are.

Real-sized models with random weights, in the released formats, for the slow test and
bench/bench_paperscale.py: `save_full_size_models` (GPT-2 124M and RoBERTa-base with tokenizers of
the released vocabulary sizes) and `save_full_size_clip` (ViT-L/14, fp16 as OpenAI ships it).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220),
           "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128)}
SPLITS = ["train"] * 6 + ["restval"] * 2 + ["val"] * 2 + ["test"] * 2
FLICKR_SPLITS = ["train"] * 2 + ["val"] * 2 + ["test"] * 3
WEB_IMAGES = 4


@dataclass
class PaperFixture:
    root: Path
    split_file: Path
    image_root: Path
    corpus_file: Path
    gpt2: Path
    roberta: Path
    clip: Path
    clip_bpe: Path
    flickr_split_file: Path
    flickr_image_root: Path
    web_split_file: Path
    web_image_root: Path

    def config(self, **overrides):
        """The RealDataConfig that prepares this fixture (tiny shards and chunks, no progress bars)."""
        from config import RealDataConfig

        fields = dict(split_file=str(self.split_file), image_root=str(self.image_root),
                      corpus="in-domain", name="coco", clip=str(self.clip),
                      clip_bpe=str(self.clip_bpe), gpt2=str(self.gpt2), roberta=str(self.roberta),
                      batch_size=3, shard_size=4, workers=0, image_chunk=3, corpus_chunk=5,
                      cache_dir=str(self.root / "cache"), device="cpu", progress=False)
        fields.update(overrides)
        return RealDataConfig(**fields)


def _draw(colour: str, shape: str, background: str, rng: random.Random, size: int = 48) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    x, y, r = rng.randint(14, 34), rng.randint(14, 34), rng.randint(8, 12)
    box = (x - r, y - r, x + r, y + r)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLOURS[colour])
    return image


def _captions(colour: str, shape: str, background: str) -> list[str]:
    return [f"A {colour} {shape} on a {background} background.",
            f"a {shape} that is {colour} in front of {background}",
            f"There is a {colour} {shape} in the picture.",
            f"A picture of one {colour} {shape}  on {background}.",
            f"The {shape} is {colour} and the background is {background}."]


def _flickr_captions(colour: str, shape: str, background: str) -> list[str]:
    return [f"Someone drew a {colour} {shape} over {background}.",
            f"A {shape} , {colour} , on a {background} background",
            f"A simple drawing of a {colour} {shape}."]


def _write_flickr(root: Path, rng: random.Random) -> tuple[Path, Path, list[str]]:
    """dataset_flickr30k.json and flickr30k/: Flickr30k's layout (bare file names) and ids."""
    image_root = root / "flickr30k"
    image_root.mkdir(parents=True, exist_ok=True)
    entries, sentences = [], []
    for k, split in enumerate(FLICKR_SPLITS):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        background = rng.choice(list(BACKGROUNDS))
        filename = f"{1000092795 + 17 * k}.jpg"
        _draw(colour, shape, background, rng).save(image_root / filename)
        caps = _flickr_captions(colour, shape, background)
        sentences += caps
        entries.append({"filename": filename, "imgid": k, "split": split,
                        "sentences": [{"raw": c, "imgid": k} for c in caps]})
    split_file = root / "dataset_flickr30k.json"
    split_file.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return split_file, image_root, sentences


def _write_web(root: Path, rng: random.Random) -> tuple[Path, Path]:
    """dataset_web.json and web/: uncaptioned training images, as web-crawled ones would be."""
    image_root = root / "web"
    image_root.mkdir(parents=True, exist_ok=True)
    entries = []
    for k in range(WEB_IMAGES):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        _draw(colour, shape, rng.choice(list(BACKGROUNDS)), rng).save(image_root / f"web_{k}.png")
        entries.append({"filename": f"web_{k}.png", "imgid": k, "split": "train", "sentences": []})
    split_file = root / "dataset_web.json"
    split_file.write_text(json.dumps({"images": entries, "dataset": "web"}))
    return split_file, image_root


def _corpus_lines(rng: random.Random) -> list[str]:
    lines = []
    for colour in COLOURS:
        for shape in SHAPES:
            lines.append(f"A small {colour} {shape} near the middle.")
            lines.append(f"a {colour} {shape} sitting on a plain background")
    lines += ["", "   ", "Ok.", lines[0], lines[1].upper()]
    rng.shuffle(lines)
    return lines


def _clip_merges(sentences: list[str]) -> list[tuple[str, str]]:
    """Merges that spell every fixture word left to right (a valid, tiny CLIP BPE file)."""
    merges, seen = [], set()
    for word in sorted({w.strip(".,").lower() for s in sentences for w in s.split()} - {""}):
        parts = [*word[:-1], word[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            if (left, right) not in seen:
                seen.add((left, right))
                merges.append((left, right))
            left += right
    return merges


def _save_hf_models(sentences: list[str], gpt2_dir: Path, roberta_dir: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, RobertaConfig,
                              RobertaModel, RobertaTokenizerFast)

    gpt_bpe = ByteLevelBPETokenizer()
    gpt_bpe.train_from_iterator(sentences, vocab_size=400, min_frequency=1,
                                special_tokens=["<|endoftext|>"], show_progress=False)
    gpt_tok = GPT2TokenizerFast(tokenizer_object=gpt_bpe, bos_token="<|endoftext|>",
                                eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    rob_bpe = ByteLevelBPETokenizer()
    rob_bpe.train_from_iterator(sentences, vocab_size=400, min_frequency=1, show_progress=False,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    rob_tok = RobertaTokenizerFast(tokenizer_object=rob_bpe, bos_token="<s>", eos_token="</s>",
                                   sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>")
    for tok in (gpt_tok, rob_tok):
        if len(tok) == 0 or tok.convert_tokens_to_ids(tok.eos_token) is None:
            raise RuntimeError("fixture tokenizer came out empty")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(gpt_tok), n_positions=64, n_embd=32, n_layer=2,
                                      n_head=2, bos_token_id=gpt_tok.eos_token_id,
                                      eos_token_id=gpt_tok.eos_token_id))
    roberta = RobertaModel(RobertaConfig(vocab_size=len(rob_tok), hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64,
                                         max_position_embeddings=66,
                                         pad_token_id=rob_tok.pad_token_id,
                                         bos_token_id=rob_tok.bos_token_id,
                                         eos_token_id=rob_tok.eos_token_id))
    # Like the hub's gpt2 and roberta-base folders: tokenizer.json and vocab.json + merges.txt.
    for model, tok, bpe, folder in ((gpt2, gpt_tok, gpt_bpe, gpt2_dir),
                                    (roberta, rob_tok, rob_bpe, roberta_dir)):
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        bpe.save_model(str(folder))


def save_random_clip(path: Path, bpe_path: Path, seed: int = 0) -> None:
    """A random-weight tiny ViT CLIP with OpenAI's parameter names, for the vocabulary of bpe_path.

    Widths are 64 so that build_model infers one head per 64 channels, as for OpenAI's models,
    and the state dict holds OpenAI's keys only.
    """
    import torch

    import clip_model
    import clip_tokenizer

    vocab = clip_tokenizer.Tokenizer(bpe_path).vocab_size
    torch.manual_seed(seed)
    cfg = clip_model.CLIPConfig(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64,
                                vision_patch_size=16, context_length=24, vocab_size=vocab,
                                transformer_width=64, transformer_heads=1, transformer_layers=1)
    clip_model.save(clip_model.CLIP(cfg), path)


def _coco_image(image_root: Path, k: int, split: str, rng: random.Random) -> tuple[dict, list[str]]:
    """Draw image k of a split into COCO's folders; its Karpathy entry and its five captions."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    background = rng.choice(list(BACKGROUNDS))
    folder = "train2014" if split == "train" else "val2014"
    filename = f"COCO_{folder}_{k + 1:012d}.jpg"
    (image_root / folder).mkdir(parents=True, exist_ok=True)
    _draw(colour, shape, background, rng).save(image_root / folder / filename, quality=95)
    caps = _captions(colour, shape, background)
    entry = {"filepath": folder, "filename": filename, "imgid": k, "cocoid": 1000 + k,
             "split": split, "sentids": list(range(5 * k, 5 * k + 5)),
             "sentences": [{"raw": c, "tokens": c.lower().strip(".").split(), "imgid": k,
                            "sentid": 5 * k + j} for j, c in enumerate(caps)]}
    return entry, caps


def build_paperscale_fixture(root: str | Path, seed: int = 0, models: bool = True,
                             n_train: int = 0) -> PaperFixture:
    """Write the fixture under root (see the module docstring) and return its paths.

    models=False skips GPT-2/RoBERTa (the slowest part) for tests that only prepare data.
    n_train > 0 appends that many more train images (COCO ids after the default ones).
    """
    import clip_tokenizer

    root = Path(root)
    rng = random.Random(seed)
    image_root = root / "coco"
    entries, sentences = [], []
    for k, split in enumerate(SPLITS):
        entry, caps = _coco_image(image_root, k, split, rng)
        entries.append(entry)
        sentences += caps
    # Extra training images draw from their own generator: the default ones stay as they were.
    extra = random.Random(seed + 2)
    for k in range(len(SPLITS), len(SPLITS) + n_train):
        entry, caps = _coco_image(image_root, k, "train", extra)
        entries.append(entry)
        sentences += caps
    split_file = root / "dataset_coco.json"
    split_file.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    corpus_file = root / "corpus.txt"
    corpus_lines = _corpus_lines(rng)
    corpus_file.write_text("\n".join(corpus_lines) + "\n")
    sentences += [s for s in corpus_lines if s.strip()]
    # A separate generator, so that the COCO-format part stays as it was before these were added.
    other = random.Random(seed + 1)
    flickr_split_file, flickr_root, flickr_sentences = _write_flickr(root, other)
    sentences += flickr_sentences
    web_split_file, web_root = _write_web(root, other)

    clip_bpe = root / "clip_bpe.txt"
    clip_tokenizer.write_merges(clip_bpe, _clip_merges(sentences))
    clip_path = root / "clip.pt"
    save_random_clip(clip_path, clip_bpe, seed)
    gpt2, roberta = root / "gpt2", root / "roberta"
    if models:
        _save_hf_models(sentences, gpt2, roberta)
    return PaperFixture(root, split_file, image_root, corpus_file, gpt2, roberta, clip_path, clip_bpe,
                        flickr_split_file, flickr_root, web_split_file, web_root)


# ----------------------------------------------------------------------------------------------
# Real-sized models (random weights) in the released formats


def full_size_bpe(size: int, head: list[str], tail: list[str], sentences: list[str]):
    """A byte-level BPE tokenizer of exactly `size` ids, like the released GPT-2 (50257) and
    RoBERTa (50265) vocabularies: special tokens `head`, the 256 byte symbols, the merges a BPE
    trainer learns from the sentences (each of their words becomes one token, as common words
    are in the released vocabularies), two-symbol merges to fill, then special tokens `tail`."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    import clip_tokenizer

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # GPT-2's byte-to-symbol map is CLIP's (both come from OpenAI's byte-level BPE).
    symbols = list(clip_tokenizer.bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(head + symbols)}
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = byte_level
    trained.train_from_iterator(sentences, trainers.BpeTrainer(
        vocab_size=size, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
             for m in json.loads(trained.to_str())["model"]["merges"]]
    pairs += [(a, b) for a in symbols for b in symbols]
    merges = []
    for a, b in pairs:
        if len(vocab) == size - len(tail):
            break
        if a in vocab and b in vocab and a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    vocab.update({s: len(vocab) + i for i, s in enumerate(tail)})
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(head + tail)
    assert tok.get_vocab_size() == size
    return tok


def save_full_size_models(gpt2_dir: Path, roberta_dir: Path, sentences: list[str],
                          seed: int = 0) -> None:
    """Random-weight GPT-2 124M (the hub's `gpt2` shapes) and RoBERTa-base, each with a tokenizer
    of the released vocabulary size, saved with save_pretrained as the hub's folders are."""
    import torch
    from transformers import (GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, RobertaConfig,
                              RobertaModel, RobertaTokenizerFast)

    gpt_tok = GPT2TokenizerFast(tokenizer_object=full_size_bpe(
        50257, [], ["<|endoftext|>"], sentences), bos_token="<|endoftext|>",
        eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    rob_tok = RobertaTokenizerFast(tokenizer_object=full_size_bpe(
        50265, ["<s>", "<pad>", "</s>", "<unk>"], ["<mask>"], sentences),
        bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>",
        pad_token="<pad>", mask_token="<mask>")
    assert len(gpt_tok) == 50257 and gpt_tok.eos_token_id == 50256
    assert len(rob_tok) == 50265 and rob_tok.pad_token_id == 1
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(gpt2_dir)  # 124M, the released `gpt2` shapes
    gpt_tok.save_pretrained(gpt2_dir)
    RobertaModel(RobertaConfig(vocab_size=len(rob_tok), max_position_embeddings=514,
                               type_vocab_size=1, pad_token_id=1, bos_token_id=0,
                               eos_token_id=2)).save_pretrained(roberta_dir)  # roberta-base shapes
    rob_tok.save_pretrained(roberta_dir)


def full_size_clip_merges(sentences: list[str]) -> list[tuple[str, str]]:
    """As many merges as OpenAI's CLIP uses (48,894: a 49,408-id vocabulary, ViT-L/14's), so that
    no merges file need be downloaded: those that spell the sentences' words, then pairs of byte
    symbols to fill."""
    import clip_tokenizer

    merges = _clip_merges(sentences)
    seen = {a + b for a, b in merges}
    symbols = list(clip_tokenizer.bytes_to_unicode().values())
    for a in symbols:
        for b in symbols + [s + "</w>" for s in symbols]:
            if len(merges) == clip_tokenizer.MAX_MERGES:
                return merges
            if a + b not in seen:
                seen.add(a + b)
                merges.append((a, b))
    return merges


def save_full_size_clip(path: Path, bpe_path: Path | None = None, sentences: list[str] = (),
                        seed: int = 0, device: str = "cpu") -> None:
    """A random-weight ViT-L/14 CLIP in fp16, as OpenAI ships it, saved with OpenAI's key names;
    with bpe_path, also a merges file of OpenAI's size for the sentences (full_size_clip_merges),
    else the model reads OpenAI's own file (clip_tokenizer's default BPE, downloaded once).

    device="cuda" draws the 428M random weights on the GPU, much faster than on a few CPU cores.
    """
    import torch

    import clip_model
    import clip_tokenizer

    if bpe_path is not None:
        clip_tokenizer.write_merges(bpe_path, full_size_clip_merges(list(sentences)))
    torch.manual_seed(seed)
    with torch.device(device):
        model = clip_model.CLIP(clip_model.OPENAI_CONFIGS["ViT-L/14"]).half()
    clip_model.save(model.cpu(), path)
