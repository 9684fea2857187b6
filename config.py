"""The configuration of a CgT-GAN run: one dataclass per component, the paper's presets, one parser.

CgT-GAN (Yu et al., ACM MM 2023, arXiv:2308.12045) has a generator (Sec. 3.1), a discriminator
(Sec. 3.2), a text-only initialisation and an adversarial self-critical stage (Sec. 3.4), trained on
a world of unpaired images and sentences. Each of those gets a dataclass here whose defaults run the
ShapesWorld demo on a laptop CPU; the paper-scale settings (Sec. 4.1) are named presets of the same
fields. `apply_overrides` is the one way a value enters a config, from `--set KEY=VALUE`, a preset
or a run's config.json: every key is checked against its field and parsed to the field's type.

This file imports nothing heavy (no torch), so `python cgtgan.py --help` answers at once, and every
other module can import it.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from enum import Enum

import shapes_grammar


class ConfigError(ValueError):
    """A one-line, user-facing problem with a config, a checkpoint or a command-line argument."""


# ----------------------------------------------------------------------------------------------
# The method's components


class Reward(str, Enum):
    """The generator's reward, as in the paper's ablation (Sec. 4.3): which semantic term (Sec. 3.3)
    and whether the discriminator's naturalness reward (Sec. 3.2) is on."""

    COS = "cos"  # CLIP-cos alone
    AGG = "agg"  # CLIP-agg alone
    AGG_GAN = "agg+gan"  # CLIP-agg + the discriminator: CgT-GAN itself
    GAN = "gan"  # the discriminator alone (a plain text GAN)

    def __str__(self) -> str:
        return self.value  # "agg+gan" in messages and run names, on every Python version

    @property
    def semantic(self) -> str | None:
        """"cos", "agg" or None (no CLIP reward)."""
        return {"cos": "cos", "agg": "agg", "agg+gan": "agg", "gan": None}[self.value]

    @property
    def naturalness(self) -> bool:
        return self in (Reward.AGG_GAN, Reward.GAN)


@dataclass
class GeneratorConfig:
    prefix_len: int = 5  # P visual prompt tokens (the paper: 10)
    mapping_hidden: int = 0  # hidden width of the mapping MLP; 0 means P*E/2 as in ClipCap
    pretrained: str = ""  # GPT-2 directory (or hub name); "" builds the small model below
    n_layer: int = 2
    n_embd: int = 96  # E
    n_head: int = 4
    dropout: float = 0.0
    max_len: int = 20  # the paper caps captions at 20 tokens
    end_token: str = "."  # the paper ends captions at "."
    # The mapping network reads CLIP embeddings L2-normalised (ours: one scale for text embeddings
    # at initialisation and image embeddings later), or raw, as the official code does (its
    # --normalize_prefix is off); raw needs the norms a prepared real dataset stores.
    normalize_prefix: bool = True


@dataclass
class DiscriminatorConfig:
    pretrained: str = ""  # RoBERTa directory (or hub name); "" builds the small model below
    n_layer: int = 2
    hidden: int = 64  # H
    n_head: int = 2
    dropout: float = 0.1
    # "cls": a head H -> H -> 1 on the <s> state (ours); "pooler": RoBERTa's pooler (dense + tanh
    # on <s>, pretrained), then H -> H/2 -> 1, as the official code (768 -> 384 -> 1).
    head: str = "cls"
    # RoBERTa inputs cut to this many tokens, "." and </s> last, for corpus sentences and
    # captions alike (official: 22 = 20 + <s> + </s>); 0 cuts nothing.
    max_tokens: int = 0


@dataclass
class InitConfig:
    """Text-only initialisation (Sec. 3.1): reconstruct corpus sentences from their CLIP text embedding."""

    steps: int = 600  # i.i.d. batches of corpus sentences, when epochs is 0
    epochs: int = 0  # > 0: shuffled passes over the corpus instead, epochs * (M // batch) steps
    batch: int = 64  # global: split over data-parallel processes
    lr: float = 2e-3
    warmup: int = 0  # steps of linear learning-rate warm-up from 0 (official: 5000)
    weight_decay: float = 0.01
    # Comma-separated parts of parameter names left out of weight decay (official:
    # "bias,LayerNorm.weight"; GPT-2 names its LayerNorms ln_*, so their weights are decayed).
    no_decay: str = ""
    grad_clip: float = 1.0  # max gradient norm; 0 clips nothing (the official initialisation)
    noise: float = 0.0  # std of Gaussian noise on the text embedding (CapDec); off as in the paper


@dataclass
class GANConfig:
    """Adversarial self-critical training on unpaired images (Sec. 3.4)."""

    steps: int = 300  # i.i.d. batches of training images, when epochs is 0
    epochs: int = 0  # > 0: shuffled passes over the images instead, epochs * (N // batch) steps
    batch: int = 16  # B images per step, global: split over data-parallel processes
    k: int = 5  # K samples per image (and K real sentences per image for the discriminator)
    lr: float = 1e-4
    d_lr: float = 1e-3  # from scratch the discriminator must learn fast to keep captions fluent
    # D's dropout masks are drawn per group of about batch / d_groups consecutive images, one
    # RoBERTa forward per group under a seed drawn with the batch (train.discriminate), so W
    # data-parallel processes equal one whenever W divides d_groups. 2: one forward per process
    # on the official code's 2 GPUs; batch: one small forward per image, launch-bound.
    d_groups: int = 2
    warmup: int = 0  # steps of linear warm-up of G's learning rate (official: 150); D has none
    weight_decay: float = 0.01
    no_decay: str = ""  # as InitConfig.no_decay, for G and D
    grad_clip: float = 1.0
    reward: Reward = Reward.AGG_GAN
    agg_weight: float = 1.0  # semantic reward = w * CLIP-agg + (1 - w) * CLIP-cos
    temperature: float = 100.0  # t of the CLIP-agg softmax
    # The CLIP-agg target sums raw sentence embeddings and r_agg's L1 term compares raw vectors,
    # as the official code does; False: unit vectors throughout (needs no stored norms).
    agg_raw: bool = False
    baseline: str = "greedy"  # greedy | loo (leave-one-out mean of the other samples)
    lambda_hold: int = 30  # steps with lambda = 0 (naturalness reward only)
    lambda_ramp: int = 120  # steps of the linear ramp to lambda_final
    lambda_final: float = 0.5
    # Validation CIDEr-D every this many steps (the best checkpoint is kept); 0: after each epoch.
    eval_every: int = 100
    eval_images: int = 300  # validation images used (0: all)
    ckpt_every: int = 50


# ----------------------------------------------------------------------------------------------
# The worlds a run trains on: ShapesWorld (built offline) and the paper-scale datasets


@dataclass
class ShapesWorldConfig:
    """Sizes and settings of ShapesWorld (shapesworld.py). Building the defaults from nothing takes
    about two minutes on an idle 2-core machine, most of it CLIP pretraining; report.json records
    each step's time and `python bench/bench_shapes.py` prints the split."""

    seed: int = 0
    corpus_style: str = "plain"  # "alt": the cross-domain corpus (another grammar), Sec. 4.4
    # R; shapes sit on a 3x3 grid of 32-pixel cells. At 96 px the ResNet tower's last stage is a
    # 3x3 grid too, one position per cell, and the CLIP reads shapes inside crowded scenes; at 48 px
    # that stage is 1x1 and it read them at chance, so no captioner could name them
    # (docs/shapesworld_results.md, finding 1).
    image_size: int = 96
    n_clip_pairs: int = 24000  # image-caption pairs that pretrain the tiny CLIP, and nothing else
    n_clip_heldout: int = 1000  # held-out pairs for CLIP's retrieval and modality-gap figures
    n_train: int = 8000  # unpaired training images
    n_corpus: int = 15000  # unpaired corpus sentences, one per independent scene
    n_val: int = 300
    n_test: int = 600
    n_references: int = 5
    bpe_vocab_size: int = 1000  # GPT-2 / RoBERTa byte-level BPE vocabulary (special tokens included)
    # The tiny CLIP (clip_model.CLIPConfig) and its pretraining (shapes_clip.py). Its image tower
    # is CLIP's ModifiedResNet by default: in the same CPU time, ViTs (16- or 8-pixel patches, up
    # to 1,500 steps) learned no shapes here, only colours, sizes and positions
    # (docs/shapesworld_results.md).
    clip_image_encoder: str = "resnet"  # "resnet" (ModifiedResNet) or "vit" (VisionTransformer)
    clip_embed_dim: int = 64
    clip_vision_width: int = 8  # resnet: stem width (its last stage has 32x); vit: token width
    clip_vision_layers: int = 1  # resnet: bottleneck blocks in each of its 4 stages; vit: layers
    clip_patch_size: int = 32  # vit only: a 32-pixel patch is one grid cell
    clip_text_width: int = 64
    clip_text_layers: int = 2
    clip_heads: int = 2
    clip_context_length: int = 32
    clip_steps: int = 750
    clip_batch_size: int = 128
    clip_lr: float = 2e-3
    clip_logit_scale: float = 100.0
    clip_scale_ramp: float = 0.5  # share of the steps over which the fixed scale ramps up to it
    clip_learn_logit_scale: bool = False  # True: learn the temperature (hides the modality gap)
    # Share of each pretraining batch drawn from single-object close-ups captioned "a {colour}
    # {shape}": among them colour cannot tell images apart, so shape must. Without them the
    # ResNet learned no shapes in 500 steps either (zero-shot 21% vs 50% with them; chance 17%).
    clip_closeup_share: float = 0.5
    n_clip_closeups: int = 12000
    clip_closeup_sizes: float = 0.0  # share of close-up captions that name the size too
    # Share of each batch's pairs that are scenes beside their swap twins (two objects trade
    # shapes; shapes_clip.swap_twin), and share of those captioned by the changed object alone
    # ("a red star" beside "a red circle"); docs/shapesworld_results.md, finding 9.
    clip_swaps: float = 0.0
    clip_swap_captions: float = 0.0
    clip_size_twins: float = 0.0  # share of the twins that resize one object instead
    clip_procs: int = 1  # processes sharing each pretraining step (shapes_clip.pretrain_in_processes)
    # CPU threads of the build (torch's, and with 1 the BPE trainer's); 0: the libraries' default.
    # One, like Config.threads: beside a busy-loop process on 2 cores a CLIP step took 0.3-0.6 s
    # on 1 thread, 2.2-6.5 s on 2 (bench/bench_shapes.py --step-threads 1 2). Not in the cache
    # key: any count builds the same world, up to float rounding.
    threads: int = 1
    render_procs: int = 0  # processes that draw the images; 0: one per core, at most 4 (same pixels)
    root: str | None = None  # default: $CGTGAN_CACHE or <repo>/cache, then shapesworld/<key>

    def __post_init__(self):
        self.check()

    def check(self) -> ShapesWorldConfig:
        """Refuse settings the world cannot be built with (ConfigError naming the field)."""
        if self.corpus_style not in shapes_grammar.STYLES:
            raise ConfigError(f"world.corpus_style must be one of {', '.join(shapes_grammar.STYLES)}, "
                              f"not {self.corpus_style!r}")
        if self.clip_image_encoder not in ("resnet", "vit"):
            raise ConfigError(f"world.clip_image_encoder must be resnet or vit, "
                              f"not {self.clip_image_encoder!r}")
        vit = self.clip_image_encoder == "vit"
        if self.image_size % 3 or (vit and self.image_size % self.clip_patch_size):
            raise ConfigError(f"world.image_size {self.image_size} must be a multiple of 3 and of "
                              f"world.clip_patch_size {self.clip_patch_size}")
        if not vit and self.image_size < 32:
            raise ConfigError(f"world.image_size {self.image_size} must be at least 32: the resnet "
                              "image encoder downsamples 32x")
        if self.clip_procs < 1:
            raise ConfigError(f"world.clip_procs must be at least 1, not {self.clip_procs}")
        for name in ("clip_swaps", "clip_swap_captions", "clip_closeup_sizes", "clip_size_twins"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"world.{name} must be in [0, 1], not {getattr(self, name)}")
        if not 0 <= self.clip_closeup_share < 1:
            raise ConfigError(f"world.clip_closeup_share must be in [0, 1), "
                              f"not {self.clip_closeup_share}")
        for name in ("n_clip_pairs", "n_clip_heldout", "n_clip_closeups", "n_train", "n_corpus",
                     "n_val", "n_test"):
            if getattr(self, name) < 1:
                raise ConfigError(f"world.{name} must be at least 1")
        if self.render_procs < 0:
            raise ConfigError(f"world.render_procs must be 0 (one per CPU core) or more, "
                              f"not {self.render_procs}")
        if self.threads < 0:
            raise ConfigError(f"world.threads must be 0 (the libraries' default) or more, "
                              f"not {self.threads}")
        return self


# The CLIP-agg softmax temperature t the authors used for each setting, "images/corpus".
AGG_TEMPERATURE = {
    "coco/coco": 100.0,
    "web/gcc": 175.0,
    "coco/shutterstock": 100.0,
    "flickr30k/flickr30k": 125.0,
    "coco/flickr30k": 125.0,
    "flickr30k/coco": 125.0,
    "coco/gcc": 175.0,
}


@dataclass
class RealDataConfig:
    """Where a paper-scale dataset lives and how to prepare it (realdata.py).

    corpus: "in-domain" (the train split's own captions) or a text file, one sentence per line.
    setting: a key of AGG_TEMPERATURE, used when agg_temperature is None.
    Cleaning (applied to the corpus): lowercase, strip a final period, collapse spaces, keep
    sentences of min_words..max_words words, drop duplicates (first occurrence kept).
    missing_images: "stop" raises on missing or unreadable images, "skip" warns and drops them.
    eval_split_file, eval_image_root: when set, validation and test images and references come from
    this other Karpathy split file (ZS-IC); split_file then supplies only training images, and
    may list nothing else. eval_name names its cache folder (default: from the file name).
    workers: image-decoding processes (torch DataLoader) while embedding; shard_size: rows per
    cache file (the unit of resumption); image_chunk x corpus_chunk: the CLIP-agg tile.
    """

    split_file: str = "dataset_coco.json"
    image_root: str = "coco"
    corpus: str = "in-domain"
    name: str = ""
    eval_split_file: str = ""
    eval_image_root: str = ""
    eval_name: str = ""
    setting: str = "coco/coco"
    agg_temperature: float | None = None
    clip: str = "ViT-L/14"
    clip_bpe: str | None = None
    gpt2: str = "gpt2"
    roberta: str = "roberta-base"
    min_words: int = 3
    max_words: int = 20
    lowercase: bool = True
    strip_period: bool = True
    dedupe: bool = True
    missing_images: str = "stop"
    batch_size: int = 64
    shard_size: int = 4096
    workers: int = 4
    image_chunk: int = 2048
    corpus_chunk: int = 16384
    cache_dir: str = "cache/real"
    device: str = "auto"
    progress: bool = True

    def temperature(self) -> float:
        if self.agg_temperature is not None:
            return float(self.agg_temperature)
        if self.setting not in AGG_TEMPERATURE:
            raise ConfigError(f"unknown setting {self.setting!r}; use one of "
                              f"{sorted(AGG_TEMPERATURE)} or set agg_temperature")
        return AGG_TEMPERATURE[self.setting]

    def dataset_name(self) -> str:
        return self.name or _stem(self.split_file)

    def eval_dataset_name(self) -> str:
        """The dataset whose val/test splits are scored: eval_split_file's, else split_file's."""
        if not self.eval_split_file:
            return self.dataset_name()
        return self.eval_name or _stem(self.eval_split_file)


def _stem(path: str) -> str:
    """"data/dataset_coco.json" -> "coco"."""
    return path.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0].removeprefix("dataset_")


# ----------------------------------------------------------------------------------------------
# The whole run


@dataclass
class Config:
    name: str = ""  # run folder runs/<name>; "" derives one (run_name): data, reward, seed, settings
    runs_dir: str = "runs"
    data: str = "shapesworld"  # shapesworld | real (a paper-scale dataset made by `prepare`)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: bool = False  # bf16 autocast on CUDA
    tf32: bool = False  # TF32 matrix multiplies on CUDA (torch 1.11, the official code's, did them)
    # torch CPU threads per process; 0 keeps torch's default. One is fastest for the tiny models
    # on a 2-core machine (2 threads ran an init step several times slower beside other jobs).
    threads: int = 1
    # Processes that `train` runs as one data-parallel group here (data.in_processes):
    # what `torchrun --nproc_per_node N` runs, to float rounding; on free cores nearly N x faster.
    procs: int = 1
    decode: str = "greedy"  # greedy | beam (evaluation only)
    gen: GeneratorConfig = field(default_factory=GeneratorConfig)
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    init: InitConfig = field(default_factory=InitConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    world: ShapesWorldConfig = field(default_factory=ShapesWorldConfig)
    real: RealDataConfig = field(default_factory=RealDataConfig)


# The paper's settings (Sec. 4.1) as the official code runs them (Lihr747/CgtGAN; its README
# commands and defaults): ViT-L/14 features fed raw to the mapping network, GPT-2 124M with a prefix
# of 10, RoBERTa-base with the pooler head and 22-token inputs, K = 5, 20-token captions. The
# initialisation: one epoch of batches of 16, lr 2e-5 after 5000 warm-up steps, no clipping. The
# GAN: 50 epochs (80 with GCC) of 128 images (64 on each of 2 GPUs), lr 1e-5 for G (150 warm-up
# steps) and D, validation after each epoch. AdamW with weight decay 0.05 except on biases and
# RoBERTa's LayerNorm weights. Corpora are used as written (no lowercasing, length filter or
# de-duplication). DIFFERENCES lists what still differs. Models and data are read from local
# directories.
_NO_DECAY = "bias,LayerNorm.weight"
_PAPER = {"data": "real", "tf32": True, "real.clip": "ViT-L/14", "real.gpt2": "models/gpt2",
          "real.roberta": "models/roberta-base", "real.lowercase": False, "real.min_words": 1,
          "real.max_words": 1000, "real.dedupe": False,
          "gen.prefix_len": 10, "gen.dropout": 0.0, "gen.normalize_prefix": False,
          "disc.head": "pooler", "disc.max_tokens": 22,
          "init.epochs": 1, "init.batch": 16, "init.lr": 2e-5, "init.warmup": 5000,
          "init.weight_decay": 0.05, "init.no_decay": _NO_DECAY, "init.grad_clip": 0.0,
          "gan.epochs": 50, "gan.batch": 128, "gan.k": 5, "gan.lr": 1e-5, "gan.d_lr": 1e-5,
          "gan.warmup": 150, "gan.weight_decay": 0.05, "gan.no_decay": _NO_DECAY,
          "gan.agg_raw": True, "gan.eval_every": 0, "gan.eval_images": 0, "gan.ckpt_every": 500,
          "gan.lambda_hold": 150, "gan.lambda_ramp": 2350}
_COCO = {"real.split_file": "data/dataset_coco.json", "real.image_root": "data/coco"}
_FLICKR = {"real.split_file": "data/dataset_flickr30k.json", "real.image_root": "data/flickr30k"}
_GCC = {"real.corpus": "data/gcc.txt", "gan.epochs": 80, "gan.temperature": 175.0}
PRESETS = {
    "coco": {**_PAPER, **_COCO, "real.setting": "coco/coco", "gan.temperature": 100.0},
    "flickr30k": {**_PAPER, **_FLICKR, "real.setting": "flickr30k/flickr30k",
                  "gan.temperature": 125.0},
    "coco-shutterstock": {**_PAPER, **_COCO, "real.corpus": "data/shutterstock.txt",
                          "real.setting": "coco/shutterstock", "gan.temperature": 100.0},
    "coco-flickr30k": {**_PAPER, **_COCO, "real.corpus": "data/flickr30k_captions.txt",
                       "real.setting": "coco/flickr30k", "gan.temperature": 125.0},
    "flickr30k-coco": {**_PAPER, **_FLICKR, "real.corpus": "data/coco_captions.txt",
                       "real.setting": "flickr30k/coco", "gan.temperature": 125.0},
    "coco-gcc": {**_PAPER, **_COCO, **_GCC, "real.setting": "coco/gcc"},
    # ZS-IC: nothing in-domain in training. Web images (a Karpathy-format file listing them, all
    # "train") and the GCC corpus; validation and the test table on COCO's Karpathy split, as the
    # official code validates its GCC run on COCO; `eval --dataset flickr30k` scores Flickr30k.
    "zsic": {**_PAPER, **_GCC, "real.split_file": "data/dataset_web.json",
             "real.image_root": "data/web", "real.setting": "web/gcc",
             "real.eval_split_file": _COCO["real.split_file"],
             "real.eval_image_root": _COCO["real.image_root"]},
}

# `eval --dataset NAME`: score a paper-scale run on this dataset's Karpathy split (ZS-IC).
EVAL_DATASETS = {name: {"real.eval_split_file": paths["real.split_file"],
                        "real.eval_image_root": paths["real.image_root"]}
                 for name, paths in (("coco", _COCO), ("flickr30k", _FLICKR))}


# ----------------------------------------------------------------------------------------------
# The official code's values, and why ours differ

# What the official code runs (its defaults and README commands), in this config's keys;
# `official_values` adds the temperature and epochs of a setting. "real.max_words": 1000 stands
# for its "no length filter"; "gan.d_groups": 2 for its 2 processes, each drawing D's dropout
# masks over its own 64 images.
OFFICIAL = {
    "data": "real", "seed": 0, "bf16": False, "tf32": True, "decode": "greedy",
    "real.clip": "ViT-L/14", "real.lowercase": False, "real.strip_period": False,
    "real.min_words": 1, "real.max_words": 1000, "real.dedupe": False,
    "gen.prefix_len": 10, "gen.mapping_hidden": 0, "gen.dropout": 0.1, "gen.max_len": 20,
    "gen.end_token": ".", "gen.normalize_prefix": False,
    "disc.dropout": 0.1, "disc.head": "pooler", "disc.max_tokens": 22,
    "init.epochs": 1, "init.batch": 16, "init.lr": 2e-5, "init.warmup": 5000,
    "init.weight_decay": 0.05, "init.no_decay": _NO_DECAY, "init.grad_clip": 0.0, "init.noise": 0.0,
    "gan.epochs": 50, "gan.batch": 128, "gan.k": 5, "gan.lr": 1e-5, "gan.d_lr": 1e-5,
    "gan.warmup": 150, "gan.weight_decay": 0.05, "gan.no_decay": _NO_DECAY, "gan.grad_clip": 1.0,
    "gan.reward": "agg+gan", "gan.agg_weight": 1.0, "gan.agg_raw": True, "gan.baseline": "greedy",
    "gan.lambda_hold": 150, "gan.lambda_ramp": 2350, "gan.lambda_final": 0.5,
    "gan.eval_every": 0, "gan.eval_images": 0, "gan.d_groups": 2,
}

# The presets' settings that still differ from the official code: key -> (official, ours, why).
DIFFERENCES = {
    "gen.dropout": (0.1, 0.0, "the official code samples with GPT-2's dropout on; here tokens "
                    "are drawn under no_grad with a KV cache and a second, teacher-forced pass "
                    "gives their log-probs, which with dropout would see other masks than the "
                    "draw did"),
    "real.strip_period": (False, True, "the official code appends '.' to every sentence; here "
                          "the generator's end token '.' ends every sentence instead (the same "
                          "GPT-2 tokens), and the discriminator sees real and generated "
                          "sentences alike without it"),
}

# What differs and is no setting: (what, official, ours, why).
BEHAVIOUR_DIFFERENCES = [
    ("naturalness reward", "D's logits from a second pass, in eval mode (no dropout)",
     "the logits of D's own training pass (dropout on)", "one RoBERTa pass over the B*(K+1) "
     "captions instead of two; both are taken before D's update"),
    ("discriminator's dropout masks", "drawn from each process's own random state",
     "drawn under one seed per group of gan.batch / gan.d_groups images, drawn with the batch",
     "any number of processes that divides gan.d_groups then computes what one process does"),
    ("discriminator's real sentences", "shuffled passes over the corpus, K per image",
     "K per image, drawn uniformly with replacement each step", "every random draw of a step "
     "comes from one generator, so --resume and data parallel repeat a step exactly"),
    ("RoBERTa inputs over 22 tokens", "tokenizer.encode('.')[0] written before </s>: that is "
     "<s> (id 0), not '.'", "'.' before </s>", "what the official code means to write"),
    ("corpus case", "first letter capitalised (COCO, Flickr30k captions)", "as written",
     "realdata.clean_sentences has no capitalisation; most captions start with a capital"),
    ("lambda ramp", "lambda > 0 from the 151st step", "from the 152nd",
     "lambda_schedule counts steps from 0: one step in 2,350"),
    ("AdamW", "transformers.AdamW: weight decay after the Adam update", "torch.optim.AdamW: "
     "weight decay before it", "a difference of lr * weight_decay * update per step"),
    ("initialisation loss", "ignore_index=0, which also drops GPT-2's token '!'",
     "padding labelled IGNORE_INDEX = -1", "'!' is a token like any other"),
    ("model selection", "the best of the epochs' validation CIDEr", "the initialisation (step 0) "
     "is validated too and may be kept", "the test table shows whether the GAN stage helped"),
]


def official_values(cfg: Config) -> dict[str, object]:
    """OFFICIAL, with the CLIP-agg temperature of cfg.real.setting and 80 epochs with GCC."""
    values = dict(OFFICIAL)
    if cfg.real.setting in AGG_TEMPERATURE:
        values["gan.temperature"] = AGG_TEMPERATURE[cfg.real.setting]
    if cfg.real.setting.endswith("/gcc"):
        values["gan.epochs"] = 80
    return values


def differences(cfg: Config) -> list[tuple[str, object, object, str]]:
    """Every setting of cfg that differs from the official code's: (key, official, ours, why).

    Why: DIFFERENCES' reason where cfg has the value it documents, else the value's origin (a
    --set, or the ShapesWorld demo's own default)."""
    ours = flat_dict(config_dict(cfg))
    rows = []
    for key, official in official_values(cfg).items():
        if ours[key] == official:
            continue
        if key in DIFFERENCES and DIFFERENCES[key][1] == ours[key]:
            why = DIFFERENCES[key][2]
        elif cfg.data == "shapesworld":
            why = "the ShapesWorld demo's own value (small models from scratch on a laptop CPU)"
        else:
            why = "changed from the preset (--set)"
        rows.append((key, official, ours[key], why))
    return rows


# ----------------------------------------------------------------------------------------------
# The one parser: dotted keys, typed values


# A field's annotation (a string under `from __future__ import annotations`) -> its value type.
_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "Reward": Reward}


def parse_value(key: str, value, annotation: str):
    """value (a command-line string, or already typed) as the field's type, or ConfigError.

    Bools only from true/false/1/0/yes/no; `X | None` fields also take "none"; a Reward takes its
    value ("agg+gan"). Example: parse_value("gan.lr", "1e-4", "float") == 0.0001.
    """
    optional = annotation.endswith(" | None")
    kind = _TYPES[annotation.removesuffix(" | None")]
    if value is None or (optional and isinstance(value, str) and value.lower() == "none"):
        if optional:
            return None
        raise ConfigError(f"{key} takes {_a(kind)}, not None")
    if isinstance(value, str) and kind is not str:
        value = _parse_text(key, value, kind)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is Reward and isinstance(value, str):
        value = _parse_text(key, value, Reward)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key} takes {_a(kind)}, not {value!r}")
    return value


def _parse_text(key: str, text: str, kind):
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{key} takes true or false, not {text!r}")
        return text.lower() in ("true", "1", "yes")
    if kind is Reward:
        choices = [r.value for r in Reward]
        if text not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, not {text!r}")
        return Reward(text)
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{key} takes {_a(kind)}, not {text!r}") from None


def _a(kind) -> str:
    """"an int", "a float": the article a type's name takes in an error message."""
    name = kind.__name__
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def apply_overrides(cfg: Config, overrides: dict[str, object]) -> Config:
    """Set dotted fields (`gan.lr`, `seed`, `world.n_train`) with type checks; unknown keys refused.

    Values may be strings (from `--set key=value`) or already typed (presets, config.json).
    """
    for key, value in overrides.items():
        *path, name = key.split(".")
        target = cfg
        for part in path:
            target = getattr(target, part, None)
            if not is_dataclass(target):
                raise ConfigError(f"unknown config key {key!r}; valid keys: {_valid_keys(cfg)}")
        annotations = {f.name: f.type for f in fields(target)}
        if name not in annotations or is_dataclass(getattr(target, name)):
            raise ConfigError(f"unknown config key {key!r}; valid keys: {_valid_keys(cfg)}")
        setattr(target, name, parse_value(key, value, annotations[name]))
    return check_config(cfg)


# ----------------------------------------------------------------------------------------------
# Every value checked when a config is read, before any work starts

# What each numeric setting must be: (keys, test, the words of the message).
_RANGES = [
    (("gen.prefix_len", "gen.n_layer", "gen.n_embd", "gen.n_head", "gen.max_len", "disc.n_layer",
      "disc.hidden", "disc.n_head", "init.steps", "init.batch", "gan.steps", "gan.batch", "gan.k",
      "gan.d_groups", "gan.ckpt_every", "real.min_words", "real.batch_size", "real.shard_size",
      "real.image_chunk", "real.corpus_chunk", "world.n_references", "world.clip_steps",
      "world.clip_batch_size", "procs"), lambda v: v >= 1, "at least 1"),
    (("threads", "gen.mapping_hidden", "gan.lambda_hold", "gan.lambda_ramp", "gan.eval_images",
      "gan.eval_every", "init.epochs", "gan.epochs", "init.warmup", "gan.warmup",
      "real.workers"), lambda v: v >= 0, "at least 0"),
    (("init.lr", "gan.lr", "gan.d_lr", "gan.grad_clip", "gan.temperature",
      "real.agg_temperature", "world.clip_lr"), lambda v: math.isfinite(v) and v > 0,
     "a finite number > 0"),
    (("init.weight_decay", "gan.weight_decay", "init.noise", "init.grad_clip"),
     lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    (("gan.lambda_final", "gan.agg_weight"), lambda v: 0 <= v <= 1, "in [0, 1]"),
    (("gen.dropout", "disc.dropout"), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("disc.max_tokens",), lambda v: v == 0 or v >= 3, "0 (no cut) or at least 3 (<s>, '.', </s>)"),
]
_CHOICES = {"data": ("shapesworld", "real"), "decode": ("greedy", "beam"),
            "gan.baseline": ("greedy", "loo"), "real.missing_images": ("stop", "skip"),
            "disc.head": ("cls", "pooler")}
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_config(cfg: Config) -> Config:
    """Refuse a value no run can use, with a one-line ConfigError naming the key and what it must
    be: step counts and batches of at least 1, finite positive learning rates, shares in [0, 1],
    one of the named choices. apply_overrides calls it, so a bad --set, preset or config.json
    stops the command before any data is built. Returns cfg."""
    values = flat_dict(asdict(cfg))
    for keys, ok, what in _RANGES:
        for key in keys:
            if values[key] is not None and not ok(values[key]):
                raise ConfigError(f"{key} must be {what}, not {values[key]!r}")
    for key, choices in _CHOICES.items():
        if values[key] not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, not {values[key]!r}")
    for key in ("device", "real.device"):
        if not _DEVICE.fullmatch(values[key]):
            raise ConfigError(f"{key} must be auto, cpu, cuda or cuda:N, not {values[key]!r}")
    if cfg.gan.baseline == "loo" and cfg.gan.k < 2:
        raise ConfigError(f"gan.baseline=loo averages the other samples of an image, so it needs "
                          f"gan.k of at least 2, not {cfg.gan.k}; raise gan.k or use greedy")
    if cfg.gan.eval_every == 0 and not cfg.gan.epochs:
        raise ConfigError("gan.eval_every=0 validates after each epoch, so it needs gan.epochs "
                          "of at least 1; set gan.epochs or a step count")
    for part, width, heads in (("gen", "n_embd", "n_head"), ("disc", "hidden", "n_head")):
        if values[f"{part}.{width}"] % values[f"{part}.{heads}"]:
            raise ConfigError(f"{part}.{width} ({values[f'{part}.{width}']}) must be a multiple "
                              f"of {part}.{heads} ({values[f'{part}.{heads}']})")
    if cfg.real.min_words > cfg.real.max_words:
        raise ConfigError(f"real.min_words ({cfg.real.min_words}) must be at most "
                          f"real.max_words ({cfg.real.max_words})")
    cfg.world.check()
    return cfg


def check_world_size(cfg: Config, world_size: int) -> None:
    """Refuse, in one line, a data-parallel run whose processes cannot each take an equal share of
    the batch and, with D's dropout on, whole dropout groups (train.draw_batch): it would not
    compute what one process computes."""
    if cfg.gan.batch % world_size:
        raise ConfigError(f"gan.batch ({cfg.gan.batch}) must be a multiple of the {world_size} "
                          f"data-parallel processes; set gan.batch accordingly")
    if cfg.disc.dropout > 0 and cfg.gan.d_groups % world_size:
        raise ConfigError(f"gan.d_groups ({cfg.gan.d_groups}) must be a multiple of the "
                          f"{world_size} data-parallel processes, each holding whole dropout "
                          f"groups; set gan.d_groups={world_size} (or disc.dropout=0)")


def _valid_keys(cfg: Config) -> str:
    return ", ".join(sorted(flat_dict(asdict(cfg))))


def flat_dict(d: dict, prefix: str = "") -> dict[str, object]:
    """A nested asdict() form as dotted keys: {"gan": {"lr": 1e-4}} -> {"gan.lr": 1e-4}."""
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(flat_dict(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def config_dict(cfg: Config) -> dict:
    """cfg as nested plain values (a Reward becomes its string): what config.json and every
    checkpoint store, so that torch.load(weights_only=True) reads them back."""
    return json.loads(json.dumps(asdict(cfg)))


def config_from_dict(d: dict) -> Config:
    """A Config from its asdict() form (config.json), refusing unknown keys."""
    return apply_overrides(Config(), flat_dict(d))


def config_diff(a: dict, b: dict) -> tuple | None:
    """The first differing dotted key between two asdict() configs: (key, a_value, b_value) or None."""
    flat_a, flat_b = flat_dict(a), flat_dict(b)
    for key in sorted(set(flat_a) | set(flat_b)):
        if flat_a.get(key) != flat_b.get(key):
            return key, flat_a.get(key), flat_b.get(key)
    return None


# Settings a run's default name leaves out: what the name already says (data or preset, reward,
# seed), and where files are kept or how fast the work runs, which change no result.
NOT_IN_RUN_NAME = ("name", "runs_dir", "data", "seed", "gan.reward", "device", "threads", "procs",
                   "world.root", "world.threads", "world.render_procs", "real.cache_dir",
                   "real.workers", "real.device", "real.progress")


def run_name(cfg: Config, preset: str = "") -> str:
    """The default run name: <preset or data>[_<reward>]_seed<seed>, then, when other settings
    differ from the defaults (the preset's, with a preset), "_" and 6 hex digits of a digest of
    them, so two runs with other settings never share a folder: "shapesworld_seed0" for the
    defaults, "shapesworld_seed0_914773" with --set gan.steps=600."""
    base = apply_overrides(Config(), PRESETS[preset]) if preset else Config()
    mine, defaults = flat_dict(config_dict(cfg)), flat_dict(config_dict(base))
    changed = {k: v for k, v in mine.items() if v != defaults.get(k) and k not in NOT_IN_RUN_NAME}
    digest = hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:6]
    reward = "" if cfg.gan.reward == Reward.AGG_GAN else f"_{cfg.gan.reward}"
    return f"{preset or cfg.data}{reward}_seed{cfg.seed}" + (f"_{digest}" if changed else "")


def parse_sets(items: list[str] | None) -> dict[str, str]:
    """--set KEY=VALUE items as a dict of strings (typed by apply_overrides)."""
    overrides = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set takes KEY=VALUE, not {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value.strip()
    return overrides
