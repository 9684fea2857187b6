"""Paper-scale datasets: Karpathy split files + an image root + a corpus -> CLIP caches -> CaptionData.

The paper (CgT-GAN, arXiv:2308.12045, Sec. 4.1) trains on the images of the Karpathy train split of
MSCOCO or Flickr30k *without* their captions, and on sentences from a corpus: the train split's own
captions (in-domain, In-UIC), another dataset's captions (Cross-UIC) or a web-crawled corpus such as
Google Conceptual Captions or ShutterStock. Validation and test use the split file's references,
or, for zero-shot captioning (ZS-IC: no in-domain images or captions in training), the val/test
split of another dataset's split file (`eval_split_file`, e.g. COCO's Karpathy test). This file
turns those inputs into the `data.CaptionData` the method consumes:

    cfg = RealDataConfig(split_file="dataset_coco.json", image_root="coco", corpus="in-domain")
    prepare(cfg)                 # CLIP embeddings (fp16 shards, resumable) + CLIP-agg targets
    ds = load_real_data(cfg)     # -> CaptionData, reading only the caches
    ev = load_eval_data(cfg, "test")  # the models and one split only, for `eval`

Caches live in `cache_dir/<name>/`: `images/<split>-00000.safetensors` ..., `corpus-<source>/...`,
`agg-<key>.safetensors` and the COCO-format reference files `refs_val.json`, `refs_test.json` that
evaluate.py reads; the val/test files of an evaluation dataset live in its own folder
`cache_dir/<eval name>/`, shared by every run evaluated on it. Each shard carries a key
(data.cache_key) of the CLIP checkpoint and the exact items it embeds, so an interrupted `prepare`
resumes at the first missing shard and a cache made with another CLIP model or corpus cleaning is
detected and rebuilt.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

import clip_convert
import clip_model
import clip_tokenizer
import data
import evaluate
from cgtgan import clip_agg_target
from config import RealDataConfig
from data import CaptionData, DataError, EvalSplit

# Karpathy's "restval" images (COCO val2014 images outside the 5k val/test) are training images.
SPLIT_NAMES = {"train": "train", "restval": "train", "val": "val", "test": "test"}

# What each embedding shard holds (in its cache key, so shards of an older layout are rebuilt):
# unit rows, which rows are valid, and the raw embeddings' norms.
SHARD_ARRAYS = "feats,valid,norm"

# Files from which transformers' from_pretrained builds a byte-level BPE tokenizer.
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))


def warn(message: str) -> None:
    """A one-line warning on stderr."""
    print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Karpathy split files, corpora and reference files


@dataclass
class KarpathyImage:
    id: str
    path: Path
    split: str  # "train" | "val" | "test"
    sentences: list[str]


def read_karpathy(split_file: str | Path, image_root: str | Path,
                  option: str = "real.split_file") -> list[KarpathyImage]:
    """Images of a Karpathy split file (dataset_coco.json / dataset_flickr30k.json format).

    Ids are COCO ids where present (`cocoid`), otherwise `imgid`; paths are
    image_root/filepath/filename (filepath is absent for Flickr30k). `option` is the setting
    that names the file, quoted in errors.
    """
    split_file = Path(split_file)
    try:
        raw = json.loads(split_file.read_text(encoding="utf-8"))
        entries = raw["images"]
    except FileNotFoundError:
        raise DataError(f"split file {split_file} does not exist; download Karpathy's splits "
                        f"(dataset_coco.json / dataset_flickr30k.json) and pass its path as "
                        f"{option}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"split file {split_file} is not valid JSON ({e}); download it again") from None
    except (KeyError, TypeError):
        raise DataError(f"split file {split_file} has no 'images' list; is it a Karpathy split "
                        "file?") from None
    images, seen = [], set()
    for k, e in enumerate(entries):
        try:
            image_id = str(e["cocoid"] if "cocoid" in e else e["imgid"])
            split = SPLIT_NAMES[e["split"]]
            path = Path(image_root) / e.get("filepath", "") / e["filename"]
            sentences = [s["raw"].strip() for s in e["sentences"]]
        except (KeyError, TypeError):
            raise DataError(f"split file {split_file}: image entry {k} lacks filename, split "
                            "(train|restval|val|test), sentences[].raw or an id") from None
        if image_id in seen:
            raise DataError(f"split file {split_file}: image id {image_id} appears twice")
        seen.add(image_id)
        images.append(KarpathyImage(image_id, path, split, sentences))
    return images


def check_images(images: list[KarpathyImage], policy: str, source: str,
                 option: str = "image_root") -> list[KarpathyImage]:
    """Images whose files exist; missing ones are reported and skipped or stop the run (policy).
    `option` is the setting that names their folder, quoted in the error."""
    if policy not in ("skip", "stop"):
        raise DataError(f"missing_images must be 'skip' or 'stop', got {policy!r}")
    missing = [im for im in images if not im.path.is_file()]
    if not missing:
        return images
    message = (f"{len(missing)} of {len(images)} images listed in {source} do not exist "
               f"(first: {', '.join(str(im.path) for im in missing[:3])})")
    if policy == "stop":
        raise DataError(f"{message}; fix {option} or set missing_images='skip'")
    warn(f"{message}; skipping them")
    gone = {id(im) for im in missing}
    return [im for im in images if id(im) not in gone]


def clean_sentences(sentences: list[str], cfg: RealDataConfig) -> list[str]:
    """The corpus cleaning of cfg: normalise, filter by length, de-duplicate (order kept)."""
    out, seen = [], set()
    for s in sentences:
        s = " ".join(s.split())
        if cfg.lowercase:
            s = s.lower()
        if cfg.strip_period:
            s = s.rstrip(" .")
        if not cfg.min_words <= len(s.split()) <= cfg.max_words:
            continue
        if cfg.dedupe:
            if s in seen:
                continue
            seen.add(s)
        out.append(s)
    return out


def read_corpus(cfg: RealDataConfig, images: list[KarpathyImage]) -> list[str]:
    """The cleaned training corpus: the train split's captions (in-domain) or a text file."""
    if cfg.corpus == "in-domain":
        source = f"the train captions of {cfg.split_file}"
        raw = [s for im in images if im.split == "train" for s in im.sentences]
    else:
        source = cfg.corpus
        try:
            raw = Path(cfg.corpus).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise DataError(f"corpus file {cfg.corpus} does not exist; give a text file with one "
                            "sentence per line, or corpus='in-domain'") from None
        except UnicodeDecodeError as e:
            raise DataError(f"corpus file {cfg.corpus} is not UTF-8 text ({e})") from None
    corpus = clean_sentences(raw, cfg)
    if not corpus:
        raise DataError(f"corpus {source} is empty after cleaning ({len(raw)} lines, none with "
                        f"{cfg.min_words}..{cfg.max_words} words); check the file or the limits")
    return corpus


def coco_references(images: list[KarpathyImage]) -> dict:
    """The COCO caption-annotation format evaluate.py reads. Numeric ids are written as ints."""
    return evaluate.coco_annotations({im.id: im.sentences for im in images},
                                     {im.id: im.path.name for im in images})


def check_model_dir(path: str, what: str) -> None:
    """A local GPT-2/RoBERTa directory must hold tokenizer files; hub names are left to the loader."""
    p = Path(path)
    if not p.is_dir():
        return
    if not any(all((p / f).is_file() for f in files) for files in TOKENIZER_FILES):
        raise DataError(f"{what} directory {p} has no tokenizer files (vocab.json + merges.txt or "
                        f"tokenizer.json); save them there with tokenizer.save_pretrained('{p}')")


# ----------------------------------------------------------------------------------------------
# Sharded embedding caches


class ShardedRows:
    """Rows of a sequence of (rows, D) shard files, sliceable like one (R, D) array: the unit
    embeddings as stored, or with raw=True the raw ones (each row times its stored norm).

    Only the shards a slice touches are read (and verified), so a 3M-sentence corpus can be
    streamed without holding it in memory.
    """

    def __init__(self, paths: list[Path], keys: list[str], counts: list[int], dim: int,
                 raw: bool = False):
        self.paths, self.keys, self.counts, self.raw = paths, keys, counts, raw
        self.starts = np.cumsum([0] + counts)
        self.shape = (int(self.starts[-1]), dim)

    def shard(self, k: int) -> dict[str, np.ndarray]:
        arrays = data.load_arrays(self.paths[k], self.keys[k])
        if arrays is None:
            raise DataError(f"embedding cache {self.paths[k]} is missing, stale or corrupt; run "
                            "prepare again (it resumes)")
        return arrays

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0])
        parts = []
        for k in range(len(self.paths)):
            lo, hi = max(start, self.starts[k]), min(stop, self.starts[k + 1])
            if lo < hi:
                arrays, rows = self.shard(k), slice(lo - self.starts[k], hi - self.starts[k])
                feats = arrays["feats"][rows]  # (r, D) fp16, unit rows
                parts.append(feats * arrays["norm"][rows, None] if self.raw else feats)
        return np.concatenate(parts) if parts else np.zeros((0, self.shape[1]), np.float16)

    def load(self) -> dict[str, np.ndarray]:
        """Every array ("feats" (R, D) fp16 unit rows, "valid" (R,) uint8, "norm" (R,) float32,
        the raw embeddings' norms) across all shards."""
        shards = [self.shard(k) for k in range(len(self.paths))]
        return {name: np.concatenate([s[name] for s in shards]) for name in shards[0]}


def _shard_plan(items: list[str], cfg: RealDataConfig, folder: Path, stem: str,
                model_key: str) -> tuple[list[Path], list[str], list[int]]:
    paths, keys, counts = [], [], []
    for k, start in enumerate(range(0, len(items), cfg.shard_size)):
        chunk = items[start: start + cfg.shard_size]
        paths.append(folder / f"{stem}-{k:05d}.safetensors")
        keys.append(data.cache_key(model=model_key, items=chunk, arrays=SHARD_ARRAYS))
        counts.append(len(chunk))
    return paths, keys, counts


def _fill_shards(items: list[str], plan, encode: Callable[[list[str]], Iterator[tuple]],
                 cfg: RealDataConfig, what: str) -> None:
    """Embed every shard of `plan` whose file is missing, stale or corrupt; keep the others.

    encode(items) yields (feats (b, D) unit rows, valid (b,) bool, norms (b,)) per batch, in
    order. Each shard is written atomically, so an interruption loses at most the shard in
    progress.
    """
    from tqdm import tqdm

    paths, keys, counts = plan
    todo = [k for k in range(len(paths)) if data.load_arrays(paths[k], keys[k]) is None]
    found = {k: data.cache_info(paths[k]) for k in todo if paths[k].exists()}
    stale = [k for k, key in found.items() if key not in (None, keys[k])]
    if stale:
        warn(f"{len(stale)} cached {what} shard(s) in {paths[0].parent} were made with a different "
             "CLIP model or data; rebuilding them")
    if len(found) > len(stale):
        warn(f"{len(found) - len(stale)} cached {what} shard(s) in {paths[0].parent} are truncated "
             "or corrupt; rebuilding them")
    starts = np.cumsum([0] + counts)
    bar = tqdm(total=int(starts[-1]), initial=int(starts[-1]) - sum(counts[k] for k in todo),
               desc=f"CLIP {what}", unit=what.split()[0], disable=not cfg.progress)
    for k in todo:
        chunk = items[starts[k]: starts[k + 1]]
        feats, valid, norms = [], [], []
        for f, v, n in encode(chunk):
            feats.append(f)
            valid.append(v)
            norms.append(n)
            bar.update(len(f))
        data.save_arrays(paths[k], {"feats": np.concatenate(feats).astype(np.float16),
                                    "valid": np.concatenate(valid).astype(np.uint8),
                                    "norm": np.concatenate(norms).astype(np.float32)}, keys[k])
    bar.close()


class _ImageFiles(torch.utils.data.Dataset):
    """Preprocessed images by path; an unreadable file gives zeros and its error text, so that
    the main process (not a worker's traceback) decides whether to stop or skip."""

    def __init__(self, paths: list[str], preprocess, resolution: int):
        self.paths, self.preprocess, self.resolution = paths, preprocess, resolution

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return self.preprocess(clip_model.load_image(self.paths[i]))[0], ""  # (3, R, R)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return torch.zeros(3, self.resolution, self.resolution), re.sub(r"\s+", " ", str(e))


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero). (n, D) -> (n, D)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _unit_and_norms(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(unit rows (b, D), their norms (b,)) of CLIP embeddings x (b, D), as numpy float32."""
    x = x.float()
    return _unit(x).cpu().numpy(), x.norm(dim=1).cpu().numpy()


class ClipEncoder:
    """CLIP embeddings of image files and sentences, batch by batch, for `_fill_shards`.

    The model loads on first use, so `eval` on a split whose shards are all cached never loads it.
    `images(paths)` and `texts(sentences)` yield (feats (b, D) normalised, valid (b,) bool,
    norms (b,) of the raw embeddings).
    """

    def __init__(self, cfg: RealDataConfig):
        self.cfg, self.device = cfg, data.pick_device(cfg.device)
        self._loaded = None

    def model(self):
        """(CLIP model, preprocess, tokenizer), loaded once."""
        if self._loaded is None:
            try:
                model, preprocess = clip_model.load(self.cfg.clip, device=str(self.device))
                tokenizer = clip_tokenizer.Tokenizer(clip_bpe_file(self.cfg))
            except (OSError, ValueError, RuntimeError) as e:
                raise DataError(f"cannot load CLIP: {e}") from None
            self._loaded = (model.to(self.device).eval(), preprocess, tokenizer)
        return self._loaded

    def _amp(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda")

    def images(self, paths: list[str]):
        model, preprocess, _ = self.model()
        files = _ImageFiles(paths, preprocess, model.config.image_resolution)
        loader = torch.utils.data.DataLoader(files, self.cfg.batch_size, collate_fn=list,
                                             num_workers=self.cfg.workers)
        for batch in loader:
            pixels, errors = zip(*batch)
            bad = [e for e in errors if e]
            if bad and self.cfg.missing_images == "stop":
                raise DataError(f"{bad[0]}; or set missing_images='skip'")
            with torch.no_grad(), self._amp():
                feats = model.encode_image(torch.stack(pixels).to(self.device))  # (b, D)
            unit, norms = _unit_and_norms(feats)
            yield unit, np.array([not e for e in errors]), norms

    def texts(self, texts: list[str]):
        model, _, tokenizer = self.model()
        for b in range(0, len(texts), self.cfg.batch_size):
            tokens = clip_tokenizer.tokenize(texts[b: b + self.cfg.batch_size], truncate=True,
                                             context_length=model.config.context_length,
                                             tokenizer=tokenizer)
            with torch.no_grad(), self._amp():
                feats = model.encode_text(tokens.to(self.device))  # (b, D)
            unit, norms = _unit_and_norms(feats)
            yield unit, np.ones(len(feats), bool), norms


# ----------------------------------------------------------------------------------------------
# The plan shared by prepare, load_real_data and load_eval_data


@dataclass
class _Plan:
    images: dict[str, list[KarpathyImage]]  # split -> images whose files exist
    corpus: list[str]
    folder: Path
    model_key: str
    image_plans: dict[str, tuple]
    corpus_plan: tuple
    agg_path: Path
    agg_key: str
    eval_folder: Path  # where the val/test shards and reference files live


def _split_images(cfg: RealDataConfig, split_file: str, image_root: str, splits: tuple[str, ...],
                  option: str) -> dict[str, list[KarpathyImage]]:
    """split -> images of a split file whose files exist; every split must have some.

    Only the requested splits' files are checked, so scoring on COCO's test split does not need
    its 113k training images. option: the setting naming split_file ("real.split_file", ...).
    """
    images = [im for im in read_karpathy(split_file, image_root, option) if im.split in splits]
    images = check_images(images, cfg.missing_images, split_file,
                          option.replace("split_file", "image_root"))
    by_split = {s: [im for im in images if im.split == s] for s in splits}
    for s, ims in by_split.items():
        if not ims:
            raise DataError(f"split file {split_file} has no {s} images (after skipping missing "
                            f"ones); give a Karpathy split file with {s} images as {option}")
    return by_split


def _eval_images(cfg: RealDataConfig, splits: tuple[str, ...]) -> dict[str, list[KarpathyImage]]:
    """The val/test images scored: from eval_split_file when set (ZS-IC), else from split_file."""
    if not cfg.eval_split_file:
        return _split_images(cfg, cfg.split_file, cfg.image_root, splits, "real.split_file")
    if not cfg.eval_image_root:
        raise DataError(f"real.eval_split_file is {cfg.eval_split_file} but real.eval_image_root "
                        "is not set; give the folder that holds its images")
    return _split_images(cfg, cfg.eval_split_file, cfg.eval_image_root, splits,
                         "real.eval_split_file")


def clip_bpe_file(cfg: RealDataConfig) -> str | None:
    """CLIP's merges file: real.clip_bpe, else a Hugging Face CLIP folder's merges.txt (OpenAI's
    merges, the same format), else None (OpenAI's own file, clip_tokenizer's default)."""
    merges = Path(cfg.clip) / "merges.txt"
    if cfg.clip_bpe or not (clip_convert.is_hf_folder(cfg.clip) and merges.is_file()):
        return cfg.clip_bpe
    return str(merges)


def _model_key(cfg: RealDataConfig) -> str:
    """The cache key of the CLIP checkpoint and vocabulary (file digests, or a released name)."""
    clip = Path(cfg.clip)
    if clip_convert.is_hf_folder(clip):
        weights = [clip / f for f in clip_convert.HF_WEIGHTS if (clip / f).is_file()]
        model_id = data.file_digest(weights[0]) if weights else str(clip)
    elif clip.is_file() or cfg.clip in clip_model.MODEL_URLS:
        model_id = data.file_digest(clip) if clip.is_file() else cfg.clip
    else:
        raise DataError(f"CLIP checkpoint {cfg.clip} does not exist and is neither a Hugging Face "
                        f"CLIP folder nor a released model name ({', '.join(clip_model.MODEL_URLS)})")
    bpe = clip_bpe_file(cfg)
    return data.cache_key(clip=model_id, bpe=data.file_digest(bpe) if bpe else None)


def _image_plans(images: dict[str, list[KarpathyImage]], cfg: RealDataConfig, folder: Path,
                 model_key: str) -> dict[str, tuple]:
    return {s: _shard_plan([str(im.path) for im in ims], cfg, folder / "images", s, model_key)
            for s, ims in images.items()}


def _plan(cfg: RealDataConfig, agg_raw: bool = False) -> _Plan:
    """Which files hold what for cfg: images by split, corpus, caches, and the CLIP-agg targets
    at cfg's temperature, summed over unit or raw (agg_raw) sentence embeddings."""
    own = ("train",) if cfg.eval_split_file else ("train", "val", "test")
    images = _split_images(cfg, cfg.split_file, cfg.image_root, own, "real.split_file")
    corpus = read_corpus(cfg, images["train"])
    model_key = _model_key(cfg)
    folder = Path(cfg.cache_dir) / cfg.dataset_name()
    eval_folder = Path(cfg.cache_dir) / cfg.eval_dataset_name()
    if cfg.eval_split_file:
        images.update(_eval_images(cfg, ("val", "test")))
    image_plans = _image_plans({"train": images["train"]}, cfg, folder, model_key)
    image_plans.update(_image_plans({s: images[s] for s in ("val", "test")}, cfg, eval_folder,
                                    model_key))
    source = "indomain" if cfg.corpus == "in-domain" else re.sub(r"\W+", "_", Path(cfg.corpus).stem)
    corpus_plan = _shard_plan(corpus, cfg, folder / f"corpus-{source}", "corpus", model_key)
    agg_key = data.cache_key(images=image_plans["train"][1], corpus=corpus_plan[1],
                             t=cfg.temperature(), raw=agg_raw)
    return _Plan(images, corpus, folder, model_key, image_plans, corpus_plan,
                 folder / f"agg-{agg_key}.safetensors", agg_key, eval_folder)


def _rows(plan_part: tuple, dim: int = 0, raw: bool = False) -> ShardedRows:
    return ShardedRows(*plan_part, dim=dim, raw=raw)


def _readable(cached: dict[str, np.ndarray],
              images: list[KarpathyImage]) -> tuple[np.ndarray, np.ndarray, list]:
    """Features (n, D), their raw norms (n,) and the images of the readable images of one split
    (the others were stored as zero rows)."""
    valid = cached["valid"].astype(bool)
    if not valid.all():
        bad = [im.path for im, ok in zip(images, valid) if not ok]
        warn(f"{len(bad)} unreadable image(s) skipped (first: {', '.join(map(str, bad[:3]))})")
    return cached["feats"][valid], cached["norm"][valid], [im for im, ok in zip(images, valid) if ok]


def _unit_tensor(x: np.ndarray) -> torch.Tensor:
    """fp16 unit rows from a cache as float32, renormalised (fp16 rounding moves norms ~1e-3)."""
    return _unit(torch.from_numpy(x.astype(np.float32)))


def _eval_split(cached: dict[str, np.ndarray], images: list[KarpathyImage]) -> EvalSplit:
    """One val/test split from its cached arrays (float32, normalised, with the raw norms) and
    its references."""
    x, norms, kept = _readable(cached, images)
    return EvalSplit([im.id for im in kept], _unit_tensor(x),
                     {im.id: im.sentences for im in kept}, torch.from_numpy(norms))


# ----------------------------------------------------------------------------------------------
# prepare, load_real_data and load_eval_data


def prepare(cfg: RealDataConfig, agg_raw: bool = False) -> dict:
    """Embed every image and corpus sentence with CLIP (fp16 unit rows and the raw norms, in
    shards, resumable), write the reference files, and compute the CLIP-agg targets of the
    training images (over raw sentence embeddings with agg_raw, the official target). Returns a
    summary (counts, paths). Safe to rerun: finished shards are reused, stale ones rebuilt. With
    eval_split_file set, the val/test images embedded are that dataset's (ZS-IC)."""
    plan = _plan(cfg, agg_raw)
    for folder in (plan.folder, plan.eval_folder):
        folder.mkdir(parents=True, exist_ok=True)
    for s in ("val", "test"):
        data.write_json(plan.eval_folder / f"refs_{s}.json", coco_references(plan.images[s]))
    encoder = ClipEncoder(cfg)
    model, _, _ = encoder.model()
    for s in ("train", "val", "test"):
        _fill_shards([str(im.path) for im in plan.images[s]], plan.image_plans[s], encoder.images,
                     cfg, f"images ({s})")
    _fill_shards(plan.corpus, plan.corpus_plan, encoder.texts, cfg, "sentences")

    dim = model.config.embed_dim
    train_feats, _, train = _readable(_rows(plan.image_plans["train"], dim).load(),
                                      plan.images["train"])
    if data.load_arrays(plan.agg_path, plan.agg_key) is None:
        agg = clip_agg_target(torch.from_numpy(np.asarray(train_feats)).to(encoder.device),
                              _rows(plan.corpus_plan, dim, agg_raw), cfg.temperature(),
                              cfg.image_chunk, cfg.corpus_chunk, cfg.progress, agg_raw)  # (N, D)
        data.save_arrays(plan.agg_path, {"agg": agg.cpu().numpy().astype(np.float16)}, plan.agg_key)
    return {"name": cfg.dataset_name(), "folder": str(plan.folder),
            "eval_dataset": cfg.eval_dataset_name(), "train": len(train),
            "val": len(plan.images["val"]), "test": len(plan.images["test"]),
            "corpus": len(plan.corpus), "dim": dim, "agg_temperature": cfg.temperature(),
            "agg_raw": agg_raw, "references": {s: str(plan.eval_folder / f"refs_{s}.json") for s in ("val", "test")}}


def load_real_data(cfg: RealDataConfig, agg_raw: bool = False) -> CaptionData:
    """The prepared dataset as CaptionData (features from the caches, float32, normalised, with
    their raw norms; the CLIP-agg targets prepared with agg_raw)."""
    check_model_dir(cfg.gpt2, "GPT-2")
    check_model_dir(cfg.roberta, "RoBERTa")
    plan = _plan(cfg, agg_raw)
    paths = {im.id: im.path for ims in plan.images.values() for im in ims}

    def cached(part: tuple) -> dict[str, np.ndarray]:
        try:
            return _rows(part).load()
        except DataError as e:
            raise DataError(f"{e}; dataset {cfg.dataset_name()} is not fully prepared: run "
                            "`python cgtgan.py prepare` with the same settings") from None

    train_x, train_norms, train = _readable(cached(plan.image_plans["train"]), plan.images["train"])
    corpus = cached(plan.corpus_plan)
    splits = {s: _eval_split(cached(plan.image_plans[s]), plan.images[s]) for s in ("val", "test")}
    agg = data.load_arrays(plan.agg_path, plan.agg_key)
    if agg is None:
        raise DataError(f"CLIP-agg targets {plan.agg_path} are missing or corrupt; run "
                        "`python cgtgan.py prepare` with the same settings")
    return CaptionData(
        name=cfg.dataset_name(), clip_path=clip_file(cfg.clip),
        clip_bpe_path=Path(clip_bpe_file(cfg)) if clip_bpe_file(cfg) else None,
        gpt2_path=Path(cfg.gpt2), roberta_path=Path(cfg.roberta),
        train_ids=[im.id for im in train], train_feats=_unit_tensor(train_x),  # (N, D)
        corpus=plan.corpus, corpus_feats=_unit_tensor(corpus["feats"]), splits=splits,  # (M, D)
        image_loader=lambda i: _load_image(paths, i),
        train_agg_targets=torch.from_numpy(agg["agg"].astype(np.float32)),
        agg_temperature=cfg.temperature(), agg_raw=agg_raw,
        train_norms=torch.from_numpy(train_norms), corpus_norms=torch.from_numpy(corpus["norm"]),
    ).validate()


def load_eval_data(cfg: RealDataConfig, split: str) -> CaptionData:
    """The models and one split (val or test) of the evaluation dataset, for `cgtgan.py eval`.

    The evaluation dataset is eval_split_file's when set, else split_file's. Images whose
    embeddings are not cached yet are embedded now with the run's CLIP (atomic fp16 shards in
    cache_dir/<eval name>/, reused next time), so a run trained on one dataset can be scored on
    another without `prepare`. No training images, corpus or CLIP-agg targets are read: the
    CaptionData has none (train_feats and corpus_feats are (0, D)) and is for captioning only.
    """
    check_model_dir(cfg.gpt2, "GPT-2")
    check_model_dir(cfg.roberta, "RoBERTa")
    images = _eval_images(cfg, (split,))[split]
    folder = Path(cfg.cache_dir) / cfg.eval_dataset_name()
    part = _image_plans({split: images}, cfg, folder, _model_key(cfg))[split]
    folder.mkdir(parents=True, exist_ok=True)
    data.write_json(folder / f"refs_{split}.json", coco_references(images))
    _fill_shards([str(im.path) for im in images], part, ClipEncoder(cfg).images, cfg,
                 f"images ({split})")
    es = _eval_split(_rows(part).load(), images)
    empty = torch.zeros(0, es.feats.shape[1])  # (0, D)
    paths = {im.id: im.path for im in images}
    return CaptionData(
        name=cfg.eval_dataset_name(), clip_path=clip_file(cfg.clip),
        clip_bpe_path=Path(clip_bpe_file(cfg)) if clip_bpe_file(cfg) else None,
        gpt2_path=Path(cfg.gpt2), roberta_path=Path(cfg.roberta), train_ids=[],
        train_feats=empty, corpus=[], corpus_feats=empty, splits={split: es},
        image_loader=lambda i: _load_image(paths, i))


def clip_file(clip: str) -> Path:
    """The checkpoint file of a CLIP path or released name (where clip_model.load keeps it)."""
    if Path(clip).is_file() or clip not in clip_model.MODEL_URLS:
        return Path(clip)
    return clip_model.default_cache_dir() / clip_model.MODEL_URLS[clip].split("/")[-1]


def _load_image(paths: dict[str, Path], image_id: str) -> Image.Image:
    if image_id not in paths:
        raise DataError(f"no image with id {image_id!r} in this dataset")
    try:
        with Image.open(paths[image_id]) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {paths[image_id]}: {e}") from None
