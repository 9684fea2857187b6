"""What CgT-GAN trains on: the dataset interface, embedding caches, files written safely.

CgT-GAN (Yu et al., ACM MM 2023, arXiv:2308.12045) learns to caption from two unpaired
collections: images (seen only through their frozen CLIP image embeddings, Sec. 3.1) and a text
corpus (its sentences and their CLIP text embeddings, used by the discriminator, Sec. 3.2, and by
the CLIP-agg reward, Sec. 3.3). `CaptionData` bundles exactly that, plus the evaluation splits and
the model paths, so ShapesWorld (shapesworld.py) and the paper-scale datasets (realdata.py) reach
the method (cgtgan.py) through one interface.

This file also holds the caches every dataset builder shares (safetensors files keyed by a hash of
what they depend on, written atomically, never trusted when the key or the bytes disagree), the one
atomic file write and file digest of the project, and the device a config names.

Shape legend: N training images, M corpus sentences, n evaluation images, D CLIP embedding width.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

# A row of a feature matrix counts as L2-normalised when its norm is within this of 1. Features
# stored in fp16 carry about 1e-3 relative error, hence the loose tolerance.
NORM_TOLERANCE = 1e-2


class DataError(ValueError):
    """A one-line, user-facing problem with a dataset, a cache or a config (names the file and fix)."""


# ----------------------------------------------------------------------------------------------
# The dataset interface


@dataclass
class EvalSplit:
    """Images to caption for evaluation: ids, their CLIP image embeddings (n, D), references."""

    ids: list[str]
    feats: torch.Tensor  # (n, D) float32, L2-normalised
    references: dict[str, list[str]]
    norms: torch.Tensor | None = None  # (n,) the raw embeddings' L2 norms, where stored


@dataclass
class CaptionData:
    """The one interface the method consumes (see docs/architecture.md).

    `image_loader(id)` returns an RGB PIL image for any train/val/test id; `checker(captions, split)`
    is ShapesWorld's ground-truth checker, None for real data. `train_agg_targets` optionally holds
    the precomputed CLIP-agg targets (N, D) for the training images (real data's `prepare` computes
    them over the whole corpus; the method may compute its own when it is None), made at
    `agg_temperature`, over raw sentence embeddings when `agg_raw`. `train_norms` and
    `corpus_norms` hold the L2 norms of the raw CLIP embeddings behind the unit rows (real data
    stores them; ShapesWorld does not), for what the official code feeds raw (`raw_rows`).
    """

    name: str
    clip_path: Path
    clip_bpe_path: Path | None
    gpt2_path: Path
    roberta_path: Path
    train_ids: list[str]
    train_feats: torch.Tensor  # (N, D) float32, L2-normalised
    corpus: list[str]
    corpus_feats: torch.Tensor  # (M, D) float32, L2-normalised
    splits: dict[str, EvalSplit]
    image_loader: Callable[[str], Image.Image] | None = None
    checker: Callable[[dict[str, str], str], dict] | None = None
    train_agg_targets: torch.Tensor | None = None  # (N, D) float32, or None
    agg_temperature: float | None = None
    agg_raw: bool = False
    train_norms: torch.Tensor | None = None  # (N,) float32, or None
    corpus_norms: torch.Tensor | None = None  # (M,) float32, or None

    def image(self, image_id: str) -> Image.Image:
        """The RGB image with this id (train, val or test)."""
        if self.image_loader is None:
            raise DataError(f"dataset {self.name!r} has no images attached (only embeddings)")
        return self.image_loader(image_id)

    def check(self, captions: dict[str, str], split: str) -> dict | None:
        """Ground-truth fluency/faithfulness of captions for a split; None when there is no checker.
        ShapesWorld's also gives "per_image": {id: each word false or not (None: unparseable)}."""
        if self.checker is None:
            return None
        return self.checker(captions, split)

    def validate(self) -> "CaptionData":
        """Raise a one-line DataError if shapes, ids, corpus or references disagree; return self."""
        who = f"dataset {self.name!r}"
        feats = {"train_feats": self.train_feats, "corpus_feats": self.corpus_feats}
        feats.update({f"splits[{k!r}].feats": s.feats for k, s in self.splits.items()})
        if self.train_agg_targets is not None:
            feats["train_agg_targets"] = self.train_agg_targets
        for label, x in feats.items():
            if not isinstance(x, torch.Tensor) or x.dim() != 2:
                raise DataError(f"{who}: {label} must be a 2-D torch tensor (rows, D), "
                                f"got {type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
            if x.dtype != torch.float32:
                raise DataError(f"{who}: {label} must be float32, got {x.dtype}")
        widths = {label: x.shape[1] for label, x in feats.items()}
        if len(set(widths.values())) != 1:
            raise DataError(f"{who}: mismatched embedding widths {widths}; rebuild the caches "
                            "with one CLIP model")
        if len(self.corpus) == 0:
            raise DataError(f"{who}: the corpus is empty; give a corpus with at least one sentence")
        if len(self.train_ids) == 0:
            raise DataError(f"{who}: there are no training images")
        _same_count(who, "train_ids", len(self.train_ids), "train_feats", self.train_feats)
        _same_count(who, "corpus", len(self.corpus), "corpus_feats", self.corpus_feats)
        if self.train_agg_targets is not None:
            _same_count(who, "train_ids", len(self.train_ids), "train_agg_targets",
                        self.train_agg_targets)
        for label in ("train_feats", "corpus_feats") + tuple(
                f"splits[{k!r}].feats" for k in self.splits):
            _check_normalised(who, label, feats[label])
        self._check_norms(who)
        missing = {"val", "test"} - set(self.splits)
        if missing:
            raise DataError(f"{who}: splits lack {sorted(missing)}; both 'val' and 'test' are needed")
        for key, split in self.splits.items():
            _same_count(who, f"splits[{key!r}].ids", len(split.ids), f"splits[{key!r}].feats",
                        split.feats)
            lacking = [i for i in split.ids if not split.references.get(i)]
            if lacking:
                raise DataError(f"{who}: {len(lacking)} {key} image(s) have no reference captions "
                                f"(first: {lacking[:3]})")
        return self

    def _check_norms(self, who: str) -> None:
        """Stored norms, where present, are one positive number per row of their features."""
        norms = {"train_norms": (self.train_norms, self.train_feats),
                 "corpus_norms": (self.corpus_norms, self.corpus_feats)}
        norms.update({f"splits[{k!r}].norms": (s.norms, s.feats) for k, s in self.splits.items()})
        for label, (x, rows) in norms.items():
            if x is not None and (x.shape != rows.shape[:1] or not bool((x > 0).all())):
                raise DataError(f"{who}: {label} must be {rows.shape[0]} positive norms, got "
                                f"shape {tuple(x.shape)}; rebuild its cache")


def raw_rows(feats: torch.Tensor, norms: torch.Tensor | None, what: str) -> torch.Tensor:
    """The raw CLIP embeddings (n, D) behind unit rows feats (n, D) and their norms (n,). A
    DataError when the dataset stores no norms (ShapesWorld): `what` names the setting."""
    if norms is None:
        raise DataError(f"{what}, but this dataset stores unit CLIP embeddings only, without "
                        "their norms (ShapesWorld, or a cache prepared before norms were "
                        "stored: run prepare again); keep the default")
    return feats * norms.to(feats.dtype)[:, None]


def _same_count(who: str, a: str, count: int, b: str, x: torch.Tensor) -> None:
    if x.shape[0] != count:
        raise DataError(f"{who}: {a} has {count} entries but {b} has {x.shape[0]} rows")


def _check_normalised(who: str, label: str, x: torch.Tensor) -> None:
    if x.shape[0] == 0:
        return
    if not torch.isfinite(x).all():
        raise DataError(f"{who}: {label} contains NaN or inf; rebuild its cache")
    worst = (x.norm(dim=1) - 1).abs().max().item()
    if worst > NORM_TOLERANCE:
        raise DataError(f"{who}: {label} rows are not L2-normalised (max |norm - 1| = {worst:.3g})")


# ----------------------------------------------------------------------------------------------
# Nearest neighbours, and whether an image is like the training images


def nearest(queries: torch.Tensor, keys: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of queries (n, D), its largest dot product with a row of keys (M, D) and that
    row's index: (n,), (n,). On L2-normalised rows: the best cosine and the nearest neighbour."""
    best = torch.full((queries.shape[0],), float("-inf"), device=queries.device)
    arg = torch.zeros(queries.shape[0], dtype=torch.long, device=queries.device)
    for start in range(0, keys.shape[0], chunk):
        value, index = (queries @ keys[start:start + chunk].to(queries).T).max(1)  # (n,)
        better = value > best
        best[better], arg[better] = value[better], index[better] + start
    return best, arg


# Encoding an image file again moves its embedding by ~1e-7: a test image encoded again must not
# land past the percentile that it sets itself (cosine: absolute slack; distance: relative).
FLOAT_SLACK = 1e-4


class Familiarity:
    """Whether images are like a dataset's training images, judged in CLIP space by two scores:
    the best cosine to a training image (low for photos and drawings), and the Mahalanobis distance
    from the training images' mean under their covariance (high for blank or one-colour images,
    which a tiny CLIP places near a close-up of a shape). An image is unlike them when either
    score is worse than for all but `quantile` of the test images (at most `max_test` of them), so
    about 2% of test images would be flagged. Paper scale: about 10 s on one CPU thread for COCO
    (1,000 x 113k dot products of width 768, and a 768 x 768 covariance), instant on a GPU.
    """

    def __init__(self, data: CaptionData, device: str | torch.device = "cpu", quantile: float = 0.01,
                 max_test: int = 1000, chunk: int = 8192):
        self.train = data.train_feats.to(device)  # (N, D)
        x, d = self.train, self.train.shape[1]
        self.mean = x.mean(0, dtype=torch.float64)  # (D,)
        cov = torch.zeros(d, d, dtype=torch.float64, device=device)
        for start in range(0, x.shape[0], chunk):
            centred = x[start:start + chunk].double() - self.mean  # (c, D)
            cov += centred.T @ centred
        cov /= max(1, x.shape[0] - 1)
        ridge = 1e-6 * cov.trace() / d  # keeps it invertible with fewer images than dimensions
        self.precision = torch.linalg.inv(cov + ridge * torch.eye(d, dtype=torch.float64, device=device))
        cos, distance = self.scores(data.splits["test"].feats[:max_test])
        self.min_cos = float(torch.quantile(cos, quantile))
        self.max_distance = float(torch.quantile(distance, 1 - quantile))

    def scores(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(best cosine to a training image (n,), Mahalanobis distance (n,)) of feats (n, D)."""
        feats = feats.to(self.train)
        centred = feats.double() - self.mean  # (n, D)
        distance = ((centred @ self.precision) * centred).sum(1).clamp_min(0).sqrt()  # (n,)
        return nearest(feats, self.train)[0].double(), distance

    def unlike(self, feats: torch.Tensor) -> list[str | None]:
        """For each image (n, D): None when it is like the training images, else why it is not."""
        out = []
        for cos, distance in zip(*(x.tolist() for x in self.scores(feats))):
            if cos < self.min_cos - FLOAT_SLACK:
                out.append(f"nearest training image at cosine {cos:.3f}; 99% of test images reach "
                           f"{self.min_cos:.3f}")
            elif distance > self.max_distance * (1 + FLOAT_SLACK):
                out.append(f"Mahalanobis distance {distance:.1f} from the training images; 99% of "
                           f"test images are within {self.max_distance:.1f}")
            else:
                out.append(None)
        return out


# ----------------------------------------------------------------------------------------------
# Caches: safetensors files with their key in the metadata, written atomically


def _canonical(obj):
    """A JSON-able, order-independent form of obj for hashing (paths, dataclasses, arrays...)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {"__dataclass__": type(obj).__name__, **_canonical(asdict(obj))}
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(_canonical(v) for v in obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        digest = hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()
        return {"__array__": [str(obj.dtype), list(obj.shape), digest]}
    if isinstance(obj, bytes):
        return {"__bytes__": hashlib.sha256(obj).hexdigest()}
    if isinstance(obj, float):
        return repr(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return repr(obj)


def cache_key(**things) -> str:
    """A stable hash (16 hex chars) of everything a cache depends on.

    Order of keyword arguments does not matter; paths, dataclasses, numpy arrays and tensors are
    accepted. Example: cache_key(model="ViT-B/32", t=100.0) == cache_key(t=100.0, model="ViT-B/32").
    """
    text = json.dumps(_canonical(things), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes, read in chunks: the full digest (64 hex chars)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """file_sha256 cut to 16 hex chars: put it into a cache key for files a cache reads."""
    return file_sha256(path)[:16]


def _arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype}:{a.shape};".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary file beside path, then os.replace it into place.

    A crash leaves either the old file or the new one, never half of one; the temporary file is
    removed on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike, obj, indent: int | None = None) -> None:
    """obj as JSON (UTF-8), written atomically: a crash leaves the old file or the new one."""
    text = json.dumps(obj, indent=indent)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: str | os.PathLike):
    """A JSON file's content, or a one-line DataError naming the file and what is wrong (a cache
    reader catches it and rebuilds)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err})") from None


def save_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray], key: str) -> None:
    """Write numpy arrays to a safetensors file, with `key` and a checksum in its metadata."""
    from safetensors.numpy import save_file

    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    metadata = {"cache_key": key, "sha256": _arrays_digest(arrays)}
    atomic_write(path, lambda tmp: save_file(arrays, str(tmp), metadata=metadata))


def load_arrays(path: str | os.PathLike, key: str) -> dict[str, np.ndarray] | None:
    """The arrays saved at path under `key`, or None when the file is missing, was saved under
    another key, or is truncated or corrupt (header, length or checksum wrong). Never raises for a
    bad cache file: the caller rebuilds it.
    """
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        return None
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            if metadata.get("cache_key") != key:
                return None
            arrays = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None
    if metadata.get("sha256") != _arrays_digest(arrays):
        return None
    return arrays


def cache_info(path: str | os.PathLike) -> str | None:
    """The key a cache file was saved under, or None if it is missing or unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return (f.metadata() or {}).get("cache_key")
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None


# ----------------------------------------------------------------------------------------------
# Where tensors live


def pick_device(name: str) -> torch.device:
    """A config's device: "auto" is CUDA when present (under torchrun, the GPU of this process's
    LOCAL_RANK), else the CPU; any other name ("cpu", "cuda:1") is taken as it is."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def sum_over_processes(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over the data-parallel processes, in place, in one all-reduce of one flat
    buffer (none for no tensors); every process passes tensors of the same shapes, in order."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])  # (total elements,)
    torch.distributed.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def forks(threads: int) -> bool:
    """Whether in_processes forks its workers: where the system can, and only when each runs one
    torch thread (a forked process that runs torch on several threads can hang on its parent's
    OpenMP pool)."""
    return "fork" in torch.multiprocessing.get_all_start_methods() and threads == 1


def in_processes(fn: Callable, procs: int, threads: int, *args):
    """fn(*args) on `procs` processes of this machine that form one gloo process group, `threads`
    torch threads each (0: torch's default); returns rank 0's result. Workers are forked when
    forks(threads) (they share what args hold, uncopied), else spawned (args must then pickle).
    An error raised in a worker is raised here as itself; Ctrl-C stops every worker; a worker that
    dies without a Python error raises torch.multiprocessing.ProcessExitedException."""
    with tempfile.TemporaryDirectory() as tmp:
        context = torch.multiprocessing.start_processes(
            _worker, args=(Path(tmp), procs, threads, fn, args), nprocs=procs, join=False,
            start_method="fork" if forks(threads) else "spawn")
        try:
            while not context.join():
                pass
        except KeyboardInterrupt:
            for process in context.processes:
                process.terminate()
            raise
        except torch.multiprocessing.ProcessRaisedException as err:  # the first to fail
            if any(Path(tmp).glob("interrupted*")):
                raise KeyboardInterrupt from None
            saved = Path(tmp) / f"error{err.error_index}.pkl"
            raise (pickle.loads(saved.read_bytes()) if saved.is_file() else err) from None
        return pickle.loads((Path(tmp) / "result.pkl").read_bytes())


def _worker(rank: int, tmp: Path, procs: int, threads: int, fn: Callable, args: tuple) -> None:
    """One process of in_processes: joins the group, runs fn, saves rank 0's result or its error."""
    if threads:
        torch.set_num_threads(threads)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp / 'rendezvous'}",
                                         rank=rank, world_size=procs)
    try:
        result = fn(*args)
        if rank == 0:
            atomic_write(tmp / "result.pkl", lambda path: path.write_bytes(pickle.dumps(result)))
    except KeyboardInterrupt:
        (tmp / f"interrupted{rank}").touch()
        raise
    except Exception as err:
        try:
            (tmp / f"error{rank}.pkl").write_bytes(pickle.dumps(err))
        except (pickle.PicklingError, TypeError, AttributeError):
            (tmp / f"error{rank}.pkl").write_bytes(pickle.dumps(RuntimeError(str(err))))
        raise
    finally:
        torch.distributed.destroy_process_group()
