"""A run folder: its config, checkpoints written atomically, the metrics log, and resume.

CgT-GAN (arXiv:2308.12045, Sec. 3.4) trains in two stages and selects the checkpoint with the best
validation CIDEr; this file keeps what those stages leave on disk so that a run can be tested,
resumed after an interruption, or reused (the text-only initialisation) by another run.

Run folder (runs/<name>/): config.json, init.pt (text-only generator), init_last.pt and last.pt
(full training state for --resume: models, optimisers, random state, step), best.pt (best
validation CIDEr-D), metrics.jsonl, results.json, samples.png and curves.png (figures.py).
Checkpoints hold only tensors and plain Python values: torch.load(weights_only=True).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cgtgan import Config, ConfigError, config_diff
from data import atomic_write

if TYPE_CHECKING:
    from train import Parts


# ----------------------------------------------------------------------------------------------
# The folder and its config.json


def run_dir_for(cfg: Config) -> Path:
    """runs/<name>, or runs/<data>[_<reward>]_seed<seed> when the config names no run."""
    reward = "" if cfg.gan.reward == "agg+gan" else f"_{cfg.gan.reward}"
    return Path(cfg.runs_dir) / (cfg.name or f"{cfg.data}{reward}_seed{cfg.seed}")


def write_config(run_dir: Path, cfg: Config, resume: bool) -> None:
    """config.json, atomically; --resume first checks it is the config the run began with."""
    path = run_dir / "config.json"
    if resume and path.is_file():
        diff = config_diff(json.loads(path.read_text()), asdict(cfg))
        if diff:
            raise ConfigError(f"--resume: {path} has {diff[0]}={diff[1]!r} but this run has "
                              f"{diff[2]!r}; resume with the same settings")
    text = json.dumps(asdict(cfg), indent=2)
    atomic_write(path, lambda tmp: tmp.write_text(text))


# ----------------------------------------------------------------------------------------------
# Checkpoints: written atomically, checked against the config and data on load


def shapes_of(parts: Parts) -> dict:
    """What a checkpoint must agree on beyond the config: CLIP width and vocabularies."""
    return {"clip_dim": parts.data.train_feats.shape[1], "gpt2_vocab": len(parts.gen_tok),
            "roberta_vocab": len(parts.disc_tok)}


def data_fingerprint(data) -> str:
    """A digest of what the models were trained on: the training images' and corpus sentences'
    CLIP embeddings (every k-th row, so it costs little at paper scale) and the corpus text.
    Two worlds, or two CLIPs, with the same widths and vocabularies still differ here; the
    config alone cannot tell them apart (a code change to the world's defaults keeps it equal)."""
    h = hashlib.sha256()
    for x in (data.train_feats, data.corpus_feats):
        rows = x[::max(1, x.shape[0] // 512)].float().contiguous()  # (<=1024, D)
        h.update(str(tuple(x.shape)).encode())
        h.update(rows.cpu().numpy().round(4).tobytes())
    h.update("\n".join(data.corpus).encode())
    return h.hexdigest()[:16]


def save_checkpoint(path: Path, parts: Parts, **state) -> None:
    """Atomic torch.save of the models plus `state` (plain values and tensors only)."""
    if parts.rank != 0:
        return
    blob = {"config": asdict(parts.cfg), "shapes": shapes_of(parts), "data": parts.data_fingerprint,
            "generator": parts.gen.state_dict(), "discriminator": parts.disc.state_dict(), **state}
    atomic_write(path, lambda tmp: torch.save(blob, tmp))


def load_checkpoint(path: Path, parts: Parts, sections=("gen", "disc"),
                    same_data: bool = False) -> dict:
    """Load a checkpoint into parts' models after checking it was made for the same models, and
    with same_data (a training state to continue: --resume) on the same data."""
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} not found; train first (python cgtgan.py train)")
    try:
        blob = torch.load(path, map_location=parts.device, weights_only=True)
    except (RuntimeError, OSError, EOFError) as err:
        raise ConfigError(f"checkpoint {path} is unreadable ({type(err).__name__}); delete it "
                          "and train again") from None
    mine, theirs = asdict(parts.cfg), blob.get("config", {})
    for section in sections:
        for key, value in mine[section].items():
            if theirs.get(section, {}).get(key) != value:
                raise ConfigError(f"checkpoint {path} was made with {section}.{key}="
                                  f"{theirs.get(section, {}).get(key)!r}, but this config has "
                                  f"{value!r}; use the same setting or another run folder")
    for key, value in shapes_of(parts).items():
        if blob.get("shapes", {}).get(key) != value:
            raise ConfigError(f"checkpoint {path} was made with {key}="
                              f"{blob.get('shapes', {}).get(key)}, but this data has {value}; "
                              "use the same dataset or another run folder")
    if same_data and blob.get("data") != parts.data_fingerprint:
        raise ConfigError(f"checkpoint {path} was trained on other data (its images' or corpus's "
                          f"CLIP embeddings differ from this dataset's); train again in another "
                          f"run folder, without --resume")
    parts.gen.load_state_dict(blob["generator"])
    parts.disc.load_state_dict(blob["discriminator"])
    return blob


def init_is_current(path: Path, parts: Parts) -> bool:
    """init.pt can be reused when it was made with the same data (config and fingerprint), seed,
    generator and init settings."""
    if not path.is_file():
        return False
    blob = torch.load(path, map_location="cpu", weights_only=True)
    saved, now = blob["config"], asdict(parts.cfg)
    return (blob.get("data") == parts.data_fingerprint
            and all(saved.get(k) == now[k] for k in ("data", "seed", "world", "real", "gen", "init")))


# ----------------------------------------------------------------------------------------------
# Resume: random state and the metrics log


def rng_state(g: torch.Generator) -> dict:
    """The random state a resumed run restores: torch's, the sampling generator's and CUDA's."""
    state = {"torch": torch.get_rng_state(), "generator": g.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, g: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    g.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLog:
    """metrics.jsonl: one JSON object per line (losses, rewards, discriminator accuracy, val scores)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def __call__(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, stage: str, step: int) -> None:
        """Drop records of `stage` after `step` (what an interrupted run logged past its checkpoint)."""
        keep = [r for r in self.records() if r["stage"] != stage or r["step"] <= step]
        text = "".join(json.dumps(r) + "\n" for r in keep)
        atomic_write(self.path, lambda tmp: tmp.write_text(text))
