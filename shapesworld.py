"""ShapesWorld: the embedded default world that the CgT-GAN demo trains and evaluates on.

CgT-GAN (Yu et al., arXiv:2308.12045) needs unpaired images, an unpaired sentence corpus, a frozen
CLIP and pretrained language models. Offline, on a laptop CPU, we make all of them: scenes of
coloured shapes drawn with PIL (shapes_scenes.py), captions from the grammars in shapes_grammar.py,
byte-level BPE tokenizers for GPT-2 and RoBERTa trained on the corpus, and a tiny CLIP pretrained
contrastively on separate image-caption pairs (shapes_clip.py: it stands in for CLIP's web
pretraining, with its logit scale fixed at 100 as in the released models, so the modality gap the
paper is about is there to be closed). This file holds the world's text, the tokenizers, and the
build that makes or reuses every part and hands the world over as a data.CaptionData.

`build_shapesworld(cfg)` builds each part under `cfg.root` or reuses it when its key matches:

    world.json          scenes, corpus and references of every split      key: the world's config
    images.safetensors  uint8 images of the train, val and test splits    key: the world's config
    tokenizers/         gpt2/ and roberta/ (vocab.json, merges.txt, ...) and clip_bpe.txt
    clip.pt             the tiny CLIP (clip_model.save), clip.json: its key, digest and metrics
    feats.safetensors   L2-normalised CLIP embeddings of images and corpus sentences

Every file is written to a temporary name and renamed into place, and a part is trusted only when
its recorded key (and, for non-safetensors files, its bytes' digest) matches, so an interrupted
build leaves nothing that a later run would read. Splits: "clip" pairs (CLIP pretraining only),
"train" (unpaired images), "corpus" (unpaired sentences of independent scenes), "val", "test".

Modules import one way: shapes_grammar <- shapes_scenes <- shapes_clip <- shapesworld.

Shape legend: N images, M corpus sentences, R image resolution, D CLIP width.
"""
from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import clip_model
import clip_tokenizer
import data
import shapes_clip
import shapes_grammar as grammar
from config import ShapesWorldConfig
from shapes_scenes import make_scenes, render_all, stream_rng

# Bump when what a config builds changes (here, in shapes_scenes.py, shapes_grammar.py or
# shapes_clip.py), so old caches are rebuilt.
VERSION = 4
ROOT = Path(__file__).resolve().parent
# Fields that say where and how fast the world is built, not what it holds: never in a cache key.
NOT_CONTENT = ("root", "threads", "render_procs")


def world_key(cfg: ShapesWorldConfig, *fields: str) -> str:
    """Hash of the named config fields (all but NOT_CONTENT when none are named) and VERSION."""
    values = asdict(cfg)
    for name in NOT_CONTENT:
        values.pop(name)
    if fields:
        values = {f: values[f] for f in fields}
    return data.cache_key(version=VERSION, **values)


def world_dir(cfg: ShapesWorldConfig) -> Path:
    """cfg.root, or $CGTGAN_CACHE (default <repo>/cache) / shapesworld / <key of the config>."""
    if cfg.root is not None:
        return Path(cfg.root)
    base = Path(os.environ.get("CGTGAN_CACHE") or ROOT / "cache")
    return base / "shapesworld" / world_key(cfg)


# Which config fields each part depends on (its cache key is their hash).
WORLD_FIELDS = ("seed", "corpus_style", "image_size", "n_train", "n_corpus", "n_val", "n_test",
                "n_references")
CLIP_FIELDS = ("seed", "image_size", "n_clip_pairs", "n_clip_heldout", "n_clip_closeups") + tuple(
    f for f in ShapesWorldConfig.__dataclass_fields__ if f.startswith("clip_"))

# ----------------------------------------------------------------------------------------------
# The text of every split: scenes, corpus sentences, references


def make_world(cfg: ShapesWorldConfig) -> dict:
    """The text side of the world: scenes of train/val/test, corpus sentences, references.

    The corpus describes its own scenes (stream "corpus"), never the training images; references
    of val/test are in the plain style (the images' own domain) whatever the corpus style.
    """
    scenes = {s: make_scenes(cfg, s, n) for s, n in
              (("train", cfg.n_train), ("val", cfg.n_val), ("test", cfg.n_test))}
    rng = stream_rng(cfg, "corpus-text")
    corpus = [grammar.describe(s, cfg.corpus_style, rng) for s in
              make_scenes(cfg, "corpus", cfg.n_corpus)]
    rng = stream_rng(cfg, "references")
    references = {split: {f"{split}_{i:05d}": grammar.references(s, "plain", rng, cfg.n_references)
                          for i, s in enumerate(scenes[split])} for split in ("val", "test")}
    return {"scenes": {k: [grammar.scene_to_json(s) for s in v] for k, v in scenes.items()},
            "corpus": corpus, "references": references}


def _share_in_corpus(world: dict) -> float:
    """Share of test references that appear verbatim in the corpus."""
    corpus = set(world["corpus"])
    refs = [r for rs in world["references"]["test"].values() for r in rs]
    return sum(r in corpus for r in refs) / max(1, len(refs))


# ----------------------------------------------------------------------------------------------
# Tokenizers: CLIP's BPE merges (our own small trainer) and byte-level BPE for GPT-2 and RoBERTa


def learn_bpe(texts: list[str], max_merges: int = 4000) -> list[tuple[str, str]]:
    """BPE merges in CLIP's format, learned from word counts (Sennrich et al., 2016).

    Words are split on spaces into CLIP's byte symbols, the last marked with "</w>"; the most
    frequent adjacent pair is merged, again and again, until no pair is left or max_merges.
    Ties go to the alphabetically first pair, so the result is deterministic. Example: ["low low
    lot"] starts from l o w</w> (x2), l o t</w>; ("l", "o") occurs 3 times and is merged first.
    """
    to_symbols = clip_tokenizer.bytes_to_unicode()
    counts: dict[tuple, int] = {}
    for text in texts:
        for word in text.split():
            symbols = [to_symbols[b] for b in word.encode("utf-8")]
            key = tuple(symbols[:-1]) + (symbols[-1] + "</w>",)
            counts[key] = counts.get(key, 0) + 1
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: dict[tuple, int] = {}
        for word, n in counts.items():
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        counts = {tuple(clip_tokenizer.merge_pair(word, best)): n for word, n in counts.items()}
    return merges


HF_SPECIALS = {"gpt2": ["<|endoftext|>"], "roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]}


def train_hf_tokenizer(corpus: list[str], kind: str, vocab_size: int, directory: Path) -> None:
    """Byte-level BPE trained on the corpus, saved as GPT-2's or RoBERTa's tokenizer files
    (vocab.json, merges.txt, and save_pretrained's tokenizer.json / tokenizer_config.json)."""
    # Imported here: transformers takes most of a second to import, and only a build needs it.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast, RobertaTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=HF_SPECIALS[kind],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(corpus, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    bpe.model.save(str(directory))
    # Load back through transformers, as the paper-scale path loads "gpt2" / "roberta-base".
    cls = GPT2TokenizerFast if kind == "gpt2" else RobertaTokenizerFast
    tokenizer = cls.from_pretrained(str(directory))
    if len(tokenizer) == 0:
        raise data.DataError(f"{directory}: the trained {kind} tokenizer is empty")
    tokenizer.save_pretrained(str(directory))


# ----------------------------------------------------------------------------------------------
# Files of a part, trusted only when their key (and digests) match


def _read_keyed(path: Path, key: str) -> dict | None:
    """The JSON object at path if it was written under key, else None (missing, stale, corrupt)."""
    try:
        obj = data.read_json(path)
    except data.DataError:  # missing or corrupt: the part is rebuilt
        return None
    return obj if isinstance(obj, dict) and obj.get("key") == key else None


def _dir_digests(directory: Path) -> dict[str, str]:
    return {p.name: data.file_digest(p) for p in sorted(directory.iterdir())
            if p.is_file() and p.name != "manifest.json"}


def _tokenizers_ok(directory: Path, key: str) -> bool:
    manifest = _read_keyed(directory / "manifest.json", key)
    if manifest is None:
        return False
    try:
        return all(_dir_digests(directory / sub) == manifest["digests"][sub]
                   for sub in ("gpt2", "roberta")) and data.file_digest(
            directory / "clip_bpe.txt") == manifest["digests"]["clip_bpe.txt"]
    except (OSError, KeyError):
        return False


def train_tokenizers(directory: Path, key: str, corpus: list[str], clip_texts: list[str],
                     vocab_size: int) -> None:
    """GPT-2 and RoBERTa tokenizers from the corpus, CLIP's merges from the CLIP pairs' captions.

    They are built in a temporary directory that replaces `directory` only when complete (the
    directory's counterpart of data.atomic_write, which the manifest inside it is written with).
    """
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for kind in ("gpt2", "roberta"):
            train_hf_tokenizer(corpus, kind, vocab_size, tmp / kind)
        clip_tokenizer.write_merges(tmp / "clip_bpe.txt", learn_bpe(clip_texts))
        digests = {sub: _dir_digests(tmp / sub) for sub in ("gpt2", "roberta")}
        digests["clip_bpe.txt"] = data.file_digest(tmp / "clip_bpe.txt")
        data.write_json(tmp / "manifest.json", {"key": key, "digests": digests})
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# How the build runs: its CPU threads and the time of each step


@contextmanager
def cpu_threads(n: int):
    """Run the block on n CPU threads, then restore the previous settings; n=0 changes nothing.

    n sets torch's intra-op pool (CLIP pretraining and encoding); n=1 also makes the tokenizers
    library train serially (its pool, sized at first use, would otherwise take every core).
    Rendering and the grammars are single-threaded Python. Why deliberately: a thread that waits
    at each small op's barrier for a descheduled sibling makes a step many times slower when
    another process shares the cores (ShapesWorldConfig.threads).
    """
    if n <= 0:
        yield
        return
    torch_threads, parallelism = torch.get_num_threads(), os.environ.get("TOKENIZERS_PARALLELISM")
    torch.set_num_threads(n)
    if n == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the library at each call
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        if parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism


@dataclass
class BuildLog:
    """Wall-clock and CPU seconds of each step a build ran (CPU time shows the cost on a busy
    machine, where several processes share the cores)."""

    progress: bool
    timings_s: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str):
        if self.progress:
            tqdm.write(f"shapesworld: {name} ...")
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.timings_s[name] = round(time.perf_counter() - wall, 2)
        self.cpu_s[name] = round(time.process_time() - cpu, 2)


# ----------------------------------------------------------------------------------------------
# The build's steps, in order: each reuses its part when the key matches, else makes and saves it


def build_text(cfg: ShapesWorldConfig, root: Path, log: BuildLog) -> dict:
    """world.json: scenes, corpus and references (make_world) under the world's key."""
    key = world_key(cfg, *WORLD_FIELDS)
    world = _read_keyed(root / "world.json", key)
    if world is None:
        with log.step("text"):
            world = {"key": key, **make_world(cfg)}
            data.write_json(root / "world.json", world)
    return world


def build_images(cfg: ShapesWorldConfig, root: Path, scenes: dict, log: BuildLog
                 ) -> dict[str, np.ndarray]:
    """images.safetensors: each split's (N, R, R, 3) uint8 images, under the world's key."""
    key = world_key(cfg, *WORLD_FIELDS)
    images = data.load_arrays(root / "images.safetensors", key)
    if images is None:
        with log.step("images"):
            images = {split: render_all(cfg, split, scenes[split], log.progress)
                      for split in scenes}
            data.save_arrays(root / "images.safetensors", images, key)
    return images


def build_tokenizers(cfg: ShapesWorldConfig, root: Path, corpus: list[str], log: BuildLog
                     ) -> tuple[Path, tuple | None]:
    """tokenizers/: GPT-2's and RoBERTa's from the corpus, CLIP's merges from the CLIP pairs.
    Returns the directory and the CLIP pairs when this call drew them (else None)."""
    directory, pairs = root / "tokenizers", None
    key = data.cache_key(world=world_key(cfg, *WORLD_FIELDS), clip=world_key(cfg, *CLIP_FIELDS),
                         vocab=cfg.bpe_vocab_size)
    if not _tokenizers_ok(directory, key):
        with log.step("tokenizers"):
            pairs = shapes_clip.clip_pairs(cfg)
            train_tokenizers(directory, key, corpus, [c for caps in pairs[1] for c in caps],
                             cfg.bpe_vocab_size)
    return directory, pairs


def build_clip(cfg: ShapesWorldConfig, root: Path, tokenizer: clip_tokenizer.Tokenizer,
               bpe_path: Path, pairs: tuple | None, log: BuildLog) -> dict:
    """clip.pt: the tiny CLIP pretrained on the CLIP pairs (shapes_clip.train_clip), and
    clip.json: its key, the digest of clip.pt, and its retrieval, gap and probe figures."""
    path = root / "clip.pt"
    key = data.cache_key(clip=world_key(cfg, *CLIP_FIELDS), bpe=data.file_digest(bpe_path))
    record = _read_keyed(root / "clip.json", key)
    if record is None or not path.is_file() or data.file_digest(path) != record["digest"]:
        with log.step("clip"):
            (root / "clip.json").unlink(missing_ok=True)
            record = {"key": key, **shapes_clip.train_clip(
                cfg, pairs or shapes_clip.clip_pairs(cfg), tokenizer, path, log.progress)}
            data.write_json(root / "clip.json", record)
    return record


def build_embeddings(cfg: ShapesWorldConfig, root: Path, world: dict, images: dict,
                     tokenizer: clip_tokenizer.Tokenizer, clip_digest: str, log: BuildLog
                     ) -> dict[str, np.ndarray]:
    """feats.safetensors: (N, D) embeddings of each split's images and (M, D) of the corpus."""
    key = data.cache_key(world=world_key(cfg, *WORLD_FIELDS), clip=clip_digest)
    feats = data.load_arrays(root / "feats.safetensors", key)
    if feats is None:
        with log.step("embeddings"):
            model, _ = clip_model.load(root / "clip.pt")
            feats = {split: shapes_clip.encode_images(model, images[split], log.progress).numpy()
                     for split in images}
            feats["corpus"] = shapes_clip.encode_texts(model, tokenizer, world["corpus"],
                                                       log.progress).numpy()
            data.save_arrays(root / "feats.safetensors", feats, key)
    return feats


# ----------------------------------------------------------------------------------------------
# The whole build, and the world it hands to the method


def build_shapesworld(cfg: ShapesWorldConfig | None = None, progress: bool = True) -> data.CaptionData:
    """Build (or reuse) the world under world_dir(cfg) and return it as a data.CaptionData.

    Parts whose key matches are loaded; the rest are rebuilt in order: text (scenes, corpus,
    references), images, tokenizers, tiny CLIP, embedding caches, all on cfg.threads CPU threads.
    report.json records the time of each step this call built and the CLIP's figures; a call
    that only reuses the cache leaves the last build's record as it is.
    """
    cfg = (cfg or ShapesWorldConfig()).check()
    root = world_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    log = BuildLog(progress)
    with cpu_threads(cfg.threads):
        world = build_text(cfg, root, log)
        scenes = {k: [grammar.scene_from_json(s) for s in v] for k, v in world["scenes"].items()}
        images = build_images(cfg, root, scenes, log)
        tok_dir, pairs = build_tokenizers(cfg, root, world["corpus"], log)
        tokenizer = clip_tokenizer.Tokenizer(tok_dir / "clip_bpe.txt")
        record = build_clip(cfg, root, tokenizer, tok_dir / "clip_bpe.txt", pairs, log)
        feats = build_embeddings(cfg, root, world, images, tokenizer, record["digest"], log)
    if log.timings_s or not (root / "report.json").is_file():  # a reuse keeps the build's record
        data.write_json(root / "report.json", {
            "key": "report", "timings_s": log.timings_s, "cpu_s": log.cpu_s, "threads": cfg.threads,
            "clip": record["metrics"], "test_refs_in_corpus": _share_in_corpus(world)})
    return caption_data(cfg, root, world, scenes, images, feats)


def _split_of(image_id: str, known: dict) -> tuple[str, int]:
    split, _, index = image_id.partition("_")
    if split not in known or not index.isdigit() or int(index) >= len(known[split]):
        raise data.DataError(f"ShapesWorld has no image {image_id!r}; ids look like 'test_00012' "
                             f"(splits {sorted(known)})")
    return split, int(index)


def caption_data(cfg: ShapesWorldConfig, root: Path, world: dict, scenes: dict, images: dict,
                 feats: dict) -> data.CaptionData:
    """The built parts as the method's data.CaptionData, with an image loader and the
    ground-truth checker (shapes_grammar.check against each split's scenes, and per image
    shapes_grammar.false_words: each word's verdict, None for a caption the grammar rejects)."""
    by_split = {split: {f"{split}_{i:05d}": s for i, s in enumerate(v)} for split, v in scenes.items()}

    def image_loader(image_id: str) -> Image.Image:
        split, index = _split_of(image_id, images)
        return Image.fromarray(images[split][index])

    def checker(captions: dict[str, str], split: str) -> dict:
        if split not in by_split:
            raise data.DataError(f"ShapesWorld has no split {split!r}; use one of {sorted(by_split)}")
        unknown = [i for i in captions if i not in by_split[split]]
        if unknown:
            raise data.DataError(f"ShapesWorld split {split!r} has no image {unknown[0]!r}")
        scenes = by_split[split]
        return {**grammar.check(captions, scenes), "per_image": {
            i: grammar.false_words(c, scenes[i]) for i, c in captions.items()}}

    def tensor(name):
        return torch.from_numpy(np.ascontiguousarray(feats[name], dtype=np.float32))

    splits = {split: data.EvalSplit(ids=list(world["references"][split]), feats=tensor(split),
                                    references=world["references"][split])
              for split in ("val", "test")}
    tok_dir = root / "tokenizers"
    return data.CaptionData(
        name=f"shapesworld-{cfg.corpus_style}-seed{cfg.seed}", clip_path=root / "clip.pt",
        clip_bpe_path=tok_dir / "clip_bpe.txt", gpt2_path=tok_dir / "gpt2",
        roberta_path=tok_dir / "roberta", train_ids=list(by_split["train"]),
        train_feats=tensor("train"), corpus=world["corpus"], corpus_feats=tensor("corpus"),
        splits=splits, image_loader=image_loader, checker=checker).validate()


def load_report(cfg: ShapesWorldConfig) -> dict | None:
    """report.json of the last build of this config (its steps' timings, threads, CLIP figures),
    or None."""
    return _read_keyed(world_dir(cfg) / "report.json", "report")
