"""A run: what its stages work with, the folder it leaves, its checkpoints, and resume.

CgT-GAN (arXiv:2308.12045, Sec. 3.4) trains in two stages, text-only initialisation and then the
adversarial self-critical stage, and tests the checkpoint with the best validation CIDEr. `Run`
bundles what both stages use: the config, the data, the generator, the discriminator, their
tokenizers, CLIP's text tower and this process's place among data-parallel processes, all set up
once by `build_run` (as nanoGPT's train.py sets up its process group in one block and the loop
afterwards only asks whether it is the master process).

Run folder (runs/<name>/): config.json, init.pt (text-only generator), init_last.pt and last.pt
(full training state for --resume: models, optimisers, random state, step), best.pt (best
validation CIDEr-D), metrics.jsonl, results.json, samples.png and curves.png (figures.py).
Checkpoints hold only tensors and plain Python values: torch.load(weights_only=True).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout

import clip_model
import clip_tokenizer
from cgtgan import (CaptionGenerator, ClipText, Discriminator, build_discriminator,
                    build_generator, load_tokenizer, roberta_inputs)
from config import (Config, ConfigError, check_world_size, config_dict, config_diff,
                    run_name)
from data import CaptionData, atomic_write, pick_device, read_json, write_json

# ----------------------------------------------------------------------------------------------
# What a stage works with

# Corpus sentences tokenised per tokenizer call by Run.corpus_roberta (bounds its Python lists).
CORPUS_CHUNK = 65536


@dataclass
class Run:
    """The config, data, models and tokenizers of a run, and this process's data-parallel rank.

    `generator` and `discriminator` are the plain modules: data-parallel processes average their
    gradients explicitly (train.update), so the code that trains is the code that decodes.
    """

    cfg: Config
    data: CaptionData
    device: torch.device
    generator: CaptionGenerator
    discriminator: Discriminator
    gpt2_tokenizer: object  # transformers' GPT-2 tokenizer (the generator's vocabulary)
    roberta_tokenizer: object  # transformers' RoBERTa tokenizer (the discriminator's)
    clip_text: ClipText | None  # E_T for the CLIP rewards; None for commands that only decode
    rank: int = 0  # this process among world_size data-parallel ones (torchrun)
    world_size: int = 1
    distributed: bool = False  # in a torch.distributed process group (even a group of one)

    @property
    def master_process(self) -> bool:
        """The one process that evaluates, logs and writes files."""
        return self.rank == 0

    @functools.cached_property
    def data_fingerprint(self) -> str:
        """data_fingerprint(self.data), computed once; stored in every checkpoint."""
        return data_fingerprint(self.data)

    @property
    def disc_max_tokens(self) -> int:
        """The discriminator's input length in tokens: disc.max_tokens (0: no cut of its own), never
        more than its RoBERTa's position embeddings hold (64 for the small one, 512 released),
        so a long sentence is cut instead of overrunning them (RoBERTa's positions start at 2)."""
        capacity = self.discriminator.roberta.config.max_position_embeddings - 2
        return min(self.cfg.disc.max_tokens or capacity, capacity)

    @functools.cached_property
    def corpus_roberta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """RoBERTa ids of every corpus sentence cut at disc_max_tokens (roberta_inputs), padded:
        (M, T) int32, and their lengths (M,). Made once, in chunks (a few seconds for COCO's
        corpus), so that a CgT-GAN step looks its real examples up instead of tokenising them."""
        chunks = [roberta_inputs(self.roberta_tokenizer, self.data.corpus[i:i + CORPUS_CHUNK],
                                 self.disc_max_tokens)
                  for i in range(0, len(self.data.corpus), CORPUS_CHUNK)]
        width, pad = max(ids.shape[1] for ids, _ in chunks), self.roberta_tokenizer.pad_token_id
        ids = torch.cat([F.pad(ids, (0, width - ids.shape[1]), value=pad).int() for ids, _ in chunks])
        return ids, torch.cat([mask.sum(1) for _, mask in chunks])  # (M, T), (M,)

    def autocast(self):
        """bf16 autocast on CUDA when cfg.bf16; otherwise full precision."""
        if self.cfg.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def barrier(self) -> None:
        """Wait for every data-parallel process (nothing to wait for in one process)."""
        if self.distributed:
            torch.distributed.barrier()


def data_parallel() -> bool:
    """Whether this process is one of several data-parallel ones already (torchrun, in_processes)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or torch.distributed.is_initialized()


def init_distributed(cfg: Config) -> None:
    """Join the torchrun process group when launched with WORLD_SIZE > 1 (NCCL on GPUs, else gloo)."""
    if not data_parallel() or torch.distributed.is_initialized():
        return
    device = pick_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")


def build_run(cfg: Config, data: CaptionData, with_clip: bool = True) -> Run:
    """Tokenizers, generator, discriminator and CLIP text tower for this config and dataset.

    Paper scale (data=real) loads the released models the data names (a folder or a hub name;
    a folder without weights is refused in one line, never replaced by a random model). A
    tokenizer-only folder (ShapesWorld) means a small model trained from scratch, sized by
    cfg.gen and cfg.disc.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world_size = 0, 1
    if distributed:
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    check_world_size(cfg, world_size)
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    gpt2_tokenizer = load_tokenizer(cfg.gen.pretrained or data.gpt2_path, "GPT-2")
    roberta_tokenizer = load_tokenizer(cfg.disc.pretrained or data.roberta_path, "RoBERTa")
    gen_cfg, disc_cfg = cfg.gen, cfg.disc
    released = cfg.data == "real"
    if not gen_cfg.pretrained and (released or (Path(data.gpt2_path) / "config.json").is_file()):
        gen_cfg = replace(gen_cfg, pretrained=str(data.gpt2_path))
    if not disc_cfg.pretrained and (released or (Path(data.roberta_path) / "config.json").is_file()):
        disc_cfg = replace(disc_cfg, pretrained=str(data.roberta_path))
    torch.manual_seed(cfg.seed)
    generator = build_generator(gen_cfg, gpt2_tokenizer, data.train_feats.shape[1]).to(device)
    discriminator = build_discriminator(disc_cfg, roberta_tokenizer).to(device)
    clip_text = None
    if with_clip:
        clip, _ = clip_model.load(str(data.clip_path), device=device)
        bpe = str(data.clip_bpe_path) if data.clip_bpe_path else None
        clip_text = ClipText(clip, clip_tokenizer.Tokenizer(bpe), device,
                             normalize=not cfg.gan.agg_raw)
    return Run(cfg, data, device, generator, discriminator, gpt2_tokenizer, roberta_tokenizer,
               clip_text, rank, world_size, distributed)


# ----------------------------------------------------------------------------------------------
# The folder and its config.json


def run_dir_for(cfg: Config) -> Path:
    """runs/<name>, or runs/<config.run_name(cfg)> when the config names no run."""
    return Path(cfg.runs_dir) / (cfg.name or run_name(cfg))


@contextmanager
def folder_lock(run_dir: Path):
    """Hold run_dir/.lock while this command writes in run_dir, so that a second process starting
    there is refused in one line. Under torchrun the master process holds it (RANK is read from
    the environment: the lock is taken before the process group is joined)."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"{run_dir} is in use by another process training there; wait for it "
                          "to finish, or train in another folder with --name NEW") from None
    try:
        yield
    finally:
        lock.release()


# What a run folder holds once CgT-GAN has trained in it: its state, best checkpoint or results.
TRAINED = ("results.json", "best.pt", "last.pt")


def check_fresh(run_dir: Path, overwrite: bool = False) -> None:
    """A plain train or init (not --resume) never overwrites a run: refused in one line when
    run_dir holds one, unless overwrite (open_run_dir then removes the earlier run's files)."""
    held = [name for name in TRAINED if (run_dir / name).is_file()]
    if held and not overwrite:
        raise ConfigError(f"{run_dir} holds a run ({', '.join(held)}); continue it with --resume, "
                          "start a new one with --name NEW, or start this one again with --overwrite")


def write_config(run_dir: Path, cfg: Config, resume: bool) -> None:
    """config.json, atomically; --resume first checks it is the config the run began with."""
    path = run_dir / "config.json"
    if resume and path.is_file():
        diff = config_diff(read_json(path), config_dict(cfg))
        if diff and diff[1] is None:  # a setting newer than the run: its batches would differ
            raise ConfigError(f"--resume: {path} predates the setting {diff[0]} (this version "
                              f"uses {diff[2]!r}); start the run again with --overwrite")
        if diff:
            raise ConfigError(f"--resume: {path} has {diff[0]}={diff[1]!r} but this run has "
                              f"{diff[2]!r}; resume with the same settings")
    write_json(path, config_dict(cfg), indent=2)


# ----------------------------------------------------------------------------------------------
# Checkpoints: written atomically, checked against the config and data on load


def shapes_of(run: Run) -> dict:
    """What a checkpoint must agree on beyond the config: CLIP width and vocabularies."""
    return {"clip_dim": run.data.train_feats.shape[1], "gpt2_vocab": len(run.gpt2_tokenizer),
            "roberta_vocab": len(run.roberta_tokenizer)}


def data_fingerprint(data: CaptionData) -> str:
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


def save_checkpoint(path: Path, run: Run, **state) -> None:
    """Atomic torch.save of the models plus `state` (plain values and tensors only); master only."""
    if not run.master_process:
        return
    checkpoint = {"config": config_dict(run.cfg), "shapes": shapes_of(run), "data": run.data_fingerprint,
                  "generator": run.generator.state_dict(),
                  "discriminator": run.discriminator.state_dict(), **state}
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


# Which checkpoint entry holds each section's weights.
WEIGHTS = {"gen": "generator", "disc": "discriminator"}


def load_checkpoint(path: Path, run: Run, sections=("gen", "disc"), same_data: bool = False) -> dict:
    """Load the sections' weights into run's models after checking that the checkpoint was made
    for the same models, and with same_data (a training state to continue: --resume) on the same
    data. Returns the checkpoint."""
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} not found; train first (python cgtgan.py train)")
    try:
        checkpoint = torch.load(path, map_location=run.device, weights_only=True)
    except (RuntimeError, OSError, EOFError) as err:
        raise ConfigError(f"checkpoint {path} is unreadable ({type(err).__name__}); delete it "
                          "and train again") from None
    mine, theirs = config_dict(run.cfg), checkpoint.get("config", {})
    # A setting newer than the checkpoint counts at its default, the behaviour it was made with.
    defaults = config_dict(Config())
    for section in sections:
        for key, value in mine[section].items():
            made = theirs.get(section, {}).get(key, defaults[section][key])
            if made != value:
                raise ConfigError(f"checkpoint {path} was made with {section}.{key}={made!r}, "
                                  f"but this config has {value!r}; use the same setting or "
                                  "another run folder")
    for key, value in shapes_of(run).items():
        if checkpoint.get("shapes", {}).get(key) != value:
            raise ConfigError(f"checkpoint {path} was made with {key}="
                              f"{checkpoint.get('shapes', {}).get(key)}, but this data has {value}; "
                              "use the same dataset or another run folder")
    if same_data and checkpoint.get("data") != run.data_fingerprint:
        raise ConfigError(f"checkpoint {path} was trained on other data (its images' or corpus's "
                          f"CLIP embeddings differ from this dataset's); train again in another "
                          f"run folder, without --resume")
    modules = {"gen": run.generator, "disc": run.discriminator}
    for section in sections:
        modules[section].load_state_dict(checkpoint[WEIGHTS[section]])
    return checkpoint


def init_keys(config: dict) -> tuple[str, ...]:
    """The settings a text-only initialisation depends on (config_dict form): init.pt is reused,
    and scored, across runs that share them (the ablation's rewards, other gan.* settings)."""
    return ("data", "seed", "world" if config["data"] == "shapesworld" else "real", "gen", "disc",
            "init")


def init_is_current(path: Path, run: Run) -> bool:
    """init.pt can be reused when it was made with the same data (config and fingerprint), seed,
    models and init settings."""
    if not path.is_file():
        return False
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    saved, now = checkpoint["config"], config_dict(run.cfg)
    return (checkpoint.get("data") == run.data_fingerprint
            and all(saved.get(k) == now[k] for k in init_keys(now)))


def check_belongs(path: Path, checkpoint: dict, run_dir: Path, fingerprint: str | None) -> None:
    """A checkpoint scored as run_dir's must be that run's: made with the settings in its
    config.json (an init.pt: the initialisation's settings) and, given the fingerprint of the data
    the run trained on, on that data. One-line ConfigError otherwise."""
    saved, theirs = read_json(run_dir / "config.json"), checkpoint.get("config", {})
    if checkpoint.get("stage") == "init":
        saved, theirs = ({k: c.get(k) for k in init_keys(saved)} for c in (saved, theirs))
    diff = config_diff(theirs, saved)
    if diff:
        raise ConfigError(f"{path} is not this run's: it was made with {diff[0]}={diff[1]!r}, but "
                          f"{run_dir / 'config.json'} has {diff[2]!r}; score it with its own run")
    if fingerprint is not None and checkpoint.get("data") != fingerprint:
        raise ConfigError(f"{path} is not this run's: it was trained on other data (its images' or "
                          "corpus's CLIP embeddings differ); score it with its own run")


# ----------------------------------------------------------------------------------------------
# Resume: random state and the metrics log


def rng_state(generator: torch.Generator) -> dict:
    """The random state a resumed run restores: torch's, the batch generator's and CUDA's."""
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gather_rng_state(run: Run, generator: torch.Generator) -> list[dict]:
    """Every data-parallel process's rng_state, by rank (a list of one in one process), for the
    master to save: each process's own torch and CUDA states differ once they draw different
    numbers (the generator's dropout), and --resume gives each its own back. All processes call it."""
    if not run.distributed:
        return [rng_state(generator)]
    states = [None] * run.world_size
    torch.distributed.all_gather_object(states, rng_state(generator))
    return states


def set_rng_state(states: list[dict] | dict, generator: torch.Generator, rank: int = 0) -> None:
    """Restore this rank's entry of gather_rng_state's list (a checkpoint made by fewer processes
    gives its entries round-robin; one made before states were gathered holds a single dict)."""
    state = states[rank % len(states)] if isinstance(states, list) else states
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
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
        """Drop what an interrupted run logged past its checkpoint at `step`, which a resumed run
        logs again: `stage`'s records of later steps, and its validation records from `step` on
        (a step's checkpoint is written before that step's validation)."""
        def past(r: dict) -> bool:
            validation = any(key.startswith("val_") for key in r)
            return r["stage"] == stage and (r["step"] > step or (validation and r["step"] == step))

        keep = [r for r in self.records() if not past(r)]
        text = "".join(json.dumps(r) + "\n" for r in keep)
        atomic_write(self.path, lambda tmp: tmp.write_text(text))
