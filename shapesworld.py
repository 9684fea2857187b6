"""ShapesWorld: the embedded default world that the CgT-GAN demo trains and evaluates on.

CgT-GAN (Yu et al., arXiv:2308.12045) needs unpaired images, an unpaired sentence corpus, a frozen
CLIP and pretrained language models. Offline, on a laptop CPU, we make all of them: scenes of
coloured shapes drawn with PIL, captions from the grammars in shapes_grammar.py, byte-level BPE
tokenizers for GPT-2 and RoBERTa trained on the corpus, and a tiny CLIP pretrained contrastively on
separate image-caption pairs (shapes_clip.py: it stands in for CLIP's web pretraining, with its
logit scale fixed at 100 as in the released models, so the modality gap the paper is about is
there to be closed). This file holds the world's config, its scenes and text, rendering, the
tokenizers, and building and caching every part as a data.CaptionData.

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

Shape legend: N images, M corpus sentences, R image resolution, D CLIP width.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

import clip_model
import clip_tokenizer
import data
import shapes_grammar as grammar
from config import ShapesWorldConfig

VERSION = 4  # bump when generation changes, so old caches are rebuilt
ROOT = Path(__file__).resolve().parent


def world_key(cfg: ShapesWorldConfig, *fields: str) -> str:
    """Hash of the named config fields (all but root when none are named) and VERSION."""
    values = asdict(cfg)
    values.pop("root")
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
# Scenes and captions of every split


def stream_rng(cfg: ShapesWorldConfig, stream: str) -> random.Random:
    """Each split (and each of shapes_clip's pair, close-up and probe sets) draws from its own
    stream, so splits are independent and sizes do not interact."""
    return random.Random(f"shapesworld/{cfg.seed}/{stream}")


def make_scenes(cfg: ShapesWorldConfig, stream: str, n: int) -> list[grammar.Scene]:
    rng = stream_rng(cfg, stream)
    return [grammar.sample_scene(rng) for _ in range(n)]


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


# ----------------------------------------------------------------------------------------------
# Rendering

SUPERSAMPLE = 2  # draw at twice the size, then box-filter down: anti-aliased edges
RADIUS = {"small": 0.19, "medium": 0.29, "large": 0.40}  # fraction of a grid cell


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    """Polygon vertices of a shape of radius r centred at (cx, cy), rotated by angle degrees."""
    if shape == "diamond":  # taller than wide, so it never looks like a rotated square
        points = [(0, -1.25), (0.75, 0), (0, 1.25), (-0.75, 0)]
    else:
        corners, start, radii = {"square": (4, 45, [1.0]), "triangle": (3, -90, [1.2]),
                                 "star": (10, -90, [1.25, 0.5]), "hexagon": (6, 0, [1.05])}[shape]
        points = [(radii[k % len(radii)] * math.cos(math.radians(start + 360 * k / corners)),
                   radii[k % len(radii)] * math.sin(math.radians(start + 360 * k / corners)))
                  for k in range(corners)]
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]


def render(scene: grammar.Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """A scene -> (R, R, 3) uint8 image: tinted grey background with noise, jittered colours."""
    big, cell = size * SUPERSAMPLE, size * SUPERSAMPLE / grammar.GRID
    grey = rng.uniform(45, 150)
    background = tuple(int(grey + t) for t in rng.uniform(-12, 12, 3))
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    for o in scene:
        colour = tuple(int(v) for v in np.clip(np.array(grammar.COLOURS[o.colour])
                                               + rng.uniform(-20, 20, 3), 0, 255))
        cx, cy, r = (o.col + 0.5 + o.dx) * cell, (o.row + 0.5 + o.dy) * cell, RADIUS[o.size] * cell
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(_outline(o.shape, cx, cy, r, o.angle), fill=colour)
    pixels = np.asarray(image.resize((size, size), Image.BOX), dtype=np.float32)
    pixels = pixels + rng.normal(0, 6, pixels.shape)
    return np.clip(pixels + 0.5, 0, 255).astype(np.uint8)


def render_all(cfg: ShapesWorldConfig, stream: str, scenes: list, progress: bool) -> np.ndarray:
    """Images of a split (N, R, R, 3) uint8; image i's noise comes from (seed, stream, i) alone."""
    out = np.empty((len(scenes), cfg.image_size, cfg.image_size, 3), np.uint8)
    salt = int(data.cache_key(stream=stream)[:8], 16)
    for i, scene in enumerate(tqdm(scenes, desc=f"render {stream}", disable=not progress,
                                   leave=False)):
        out[i] = render(scene, cfg.image_size, np.random.default_rng([cfg.seed, salt, i]))
    return out


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
# Building (or reusing) every part, each trusted only when its key matches


def _write_json(path: Path, obj: dict) -> None:
    data.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj)))


def _read_json(path: Path, key: str) -> dict | None:
    """The JSON object at path if it was written under key, else None (missing, stale, corrupt)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) and obj.get("key") == key else None


def _dir_digests(directory: Path) -> dict[str, str]:
    return {p.name: data.file_digest(p) for p in sorted(directory.iterdir())
            if p.is_file() and p.name != "manifest.json"}


def _tokenizers_ok(directory: Path, key: str) -> bool:
    manifest = _read_json(directory / "manifest.json", key)
    if manifest is None:
        return False
    try:
        return all(_dir_digests(directory / sub) == manifest["digests"][sub]
                   for sub in ("gpt2", "roberta")) and data.file_digest(
            directory / "clip_bpe.txt") == manifest["digests"]["clip_bpe.txt"]
    except (OSError, KeyError):
        return False


def build_tokenizers(directory: Path, key: str, corpus: list[str], clip_texts: list[str],
                     vocab_size: int) -> None:
    """GPT-2 and RoBERTa tokenizers from the corpus, CLIP's merges from the CLIP pairs' captions;
    built in a temporary directory that replaces `directory` only when complete."""
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for kind in ("gpt2", "roberta"):
            train_hf_tokenizer(corpus, kind, vocab_size, tmp / kind)
        clip_tokenizer.write_merges(tmp / "clip_bpe.txt", learn_bpe(clip_texts))
        digests = {sub: _dir_digests(tmp / sub) for sub in ("gpt2", "roberta")}
        digests["clip_bpe.txt"] = data.file_digest(tmp / "clip_bpe.txt")
        _write_json(tmp / "manifest.json", {"key": key, "digests": digests})
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _split_of(image_id: str, known: dict) -> tuple[str, int]:
    split, _, index = image_id.partition("_")
    if split not in known or not index.isdigit() or int(index) >= len(known[split]):
        raise data.DataError(f"ShapesWorld has no image {image_id!r}; ids look like 'test_00012' "
                             f"(splits {sorted(known)})")
    return split, int(index)


def build_shapesworld(cfg: ShapesWorldConfig | None = None, progress: bool = True) -> data.CaptionData:
    """Build (or reuse) the world under world_dir(cfg) and return it as a data.CaptionData.

    Parts whose key matches are loaded; the rest are rebuilt in order: text (scenes, corpus,
    references), images, tokenizers, tiny CLIP, embedding caches. report.json records the time of
    each step of this call and the CLIP's figures.
    """
    # shapes_clip draws its pairs from this world's scenes and renderer, so it imports this module;
    # importing it here, where the CLIP is built, keeps the module imports one-way.
    import shapes_clip

    cfg = cfg or ShapesWorldConfig()
    root = world_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    # Wall-clock and CPU seconds of each step this call ran (CPU time shows the cost on a busy
    # machine, where several processes share the cores).
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def step(name):
        timings[name], cpu[name] = time.perf_counter(), time.process_time()
        if progress:
            tqdm.write(f"shapesworld: {name} ...")

    def done(name):
        timings[name] = round(time.perf_counter() - timings[name], 2)
        cpu[name] = round(time.process_time() - cpu[name], 2)

    scenes_key = world_key(cfg, *WORLD_FIELDS)
    world = _read_json(root / "world.json", scenes_key)
    if world is None:
        step("text")
        world = {"key": scenes_key, **make_world(cfg)}
        _write_json(root / "world.json", world)
        done("text")
    scenes = {k: [grammar.scene_from_json(s) for s in v] for k, v in world["scenes"].items()}

    arrays = data.load_arrays(root / "images.safetensors", scenes_key)
    if arrays is None:
        step("images")
        arrays = {split: render_all(cfg, split, scenes[split], progress) for split in scenes}
        data.save_arrays(root / "images.safetensors", arrays, scenes_key)
        done("images")

    clip_key = world_key(cfg, *CLIP_FIELDS)
    tok_dir, tok_key = root / "tokenizers", data.cache_key(world=scenes_key, clip=clip_key,
                                                           vocab=cfg.bpe_vocab_size)
    pairs = None
    if not _tokenizers_ok(tok_dir, tok_key):
        step("tokenizers")
        pairs = shapes_clip.clip_pairs(cfg)
        build_tokenizers(tok_dir, tok_key, world["corpus"],
                         [c for caps in pairs[1] for c in caps], cfg.bpe_vocab_size)
        done("tokenizers")
    bpe_path = tok_dir / "clip_bpe.txt"
    tokenizer = clip_tokenizer.Tokenizer(bpe_path)

    clip_path, clip_key = root / "clip.pt", data.cache_key(clip=clip_key,
                                                           bpe=data.file_digest(bpe_path))
    record = _read_json(root / "clip.json", clip_key)
    if record is None or not clip_path.is_file() or data.file_digest(clip_path) != record["digest"]:
        step("clip")
        (root / "clip.json").unlink(missing_ok=True)
        record = {"key": clip_key, **shapes_clip.train_clip(
            cfg, pairs or shapes_clip.clip_pairs(cfg), tokenizer, clip_path, progress)}
        _write_json(root / "clip.json", record)
        done("clip")
    model, _ = clip_model.load(clip_path)

    feats_key = data.cache_key(world=scenes_key, clip=record["digest"])
    feats = data.load_arrays(root / "feats.safetensors", feats_key)
    if feats is None:
        step("embeddings")
        feats = {split: shapes_clip.encode_images(model, arrays[split], progress).numpy()
                 for split in arrays}
        feats["corpus"] = shapes_clip.encode_texts(model, tokenizer, world["corpus"],
                                                   progress).numpy()
        data.save_arrays(root / "feats.safetensors", feats, feats_key)
        done("embeddings")

    report = {"timings_s": timings, "cpu_s": cpu, "clip": record["metrics"],
              "test_refs_in_corpus": _share_in_corpus(world)}
    _write_json(root / "report.json", {"key": "report", **report})

    images = {split: arrays[split] for split in scenes}
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
        return grammar.check(captions, by_split[split])

    def tensor(name):
        return torch.from_numpy(np.ascontiguousarray(feats[name], dtype=np.float32))

    splits = {split: data.EvalSplit(ids=list(world["references"][split]), feats=tensor(split),
                                    references=world["references"][split])
              for split in ("val", "test")}
    return data.CaptionData(
        name=f"shapesworld-{cfg.corpus_style}-seed{cfg.seed}", clip_path=clip_path,
        clip_bpe_path=bpe_path, gpt2_path=tok_dir / "gpt2", roberta_path=tok_dir / "roberta",
        train_ids=list(by_split["train"]), train_feats=tensor("train"), corpus=world["corpus"],
        corpus_feats=tensor("corpus"), splits=splits, image_loader=image_loader,
        checker=checker).validate()


def _share_in_corpus(world: dict) -> float:
    """Share of test references that appear verbatim in the corpus."""
    corpus = set(world["corpus"])
    refs = [r for rs in world["references"]["test"].values() for r in rs]
    return sum(r in corpus for r in refs) / max(1, len(refs))


def load_report(cfg: ShapesWorldConfig) -> dict | None:
    """report.json of the last build of this config (timings, CLIP figures), or None."""
    return _read_json(world_dir(cfg) / "report.json", "report")
