"""The tiny CLIP that stands in for CLIP's web pretraining in ShapesWorld.

CgT-GAN (Yu et al., arXiv:2308.12045) embeds images and sentences with a frozen CLIP (Sec. 3.1)
and rewards captions with it (Sec. 3.3); that CLIP was pretrained on web image-text pairs the
method never sees. ShapesWorld (shapesworld.py) stands it in with a tiny clip_model.CLIP
pretrained here, offline, on its own image-caption pairs: separate scenes (stream "clip", drawn by
shapes_scenes.py), each with captions in both grammars, and single-object close-ups that make it
learn shapes. Its logit scale ramps up to 100 and stays fixed there, as in the released models, so
the modality gap the paper is about is there to be closed. This file holds its pretraining pairs
and close-ups, contrastive pretraining with the logit-scale ramp, encoding of images and captions,
the retrieval and modality-gap figures, and the zero-shot shape and colour probe;
shapesworld.build_shapesworld builds and caches it with the rest of the world (`train_clip`).

Shape legend: N images, C captions per image, U distinct captions, M texts or close-ups, n held-out
or probe images, R image resolution, L CLIP context length, D CLIP width, B pairs and B' close-ups
per pretraining batch.
"""
from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import clip_model
import clip_tokenizer
import data
import shapes_grammar as grammar
from config import ShapesWorldConfig
from shapes_scenes import make_scenes, render_all, stream_rng

# ----------------------------------------------------------------------------------------------
# Pretraining pairs and close-ups


CLIP_CAPTIONS = 4  # captions per CLIP pretraining image; one is drawn each time the image is used


def clip_pairs(cfg: ShapesWorldConfig) -> tuple[list[grammar.Scene], list[list[str]]]:
    """Scenes of the CLIP pretraining pairs (training ones, then held-out ones), each with
    CLIP_CAPTIONS captions alternating between the grammars, so the tiny CLIP reads both corpus
    styles and sees each image described in several ways (its first caption is plain)."""
    scenes = make_scenes(cfg, "clip", cfg.n_clip_pairs + cfg.n_clip_heldout)
    rng = stream_rng(cfg, "clip-text")
    styles = [grammar.STYLES[k % len(grammar.STYLES)] for k in range(CLIP_CAPTIONS)]
    return scenes, [[grammar.describe(s, style, rng) for style in styles] for s in scenes]


def closeups(cfg: ShapesWorldConfig, stream: str, n: int) -> tuple[list[grammar.Scene], list[str]]:
    """n single-object scenes and their caption "a {colour} {shape}": the close-ups that teach the
    tiny CLIP shapes (stream "clip-closeup") and probe it afterwards (stream "clip-probe"). A
    cfg.clip_closeup_sizes share of the pretraining ones name the size too ("a large red star")."""
    rng = stream_rng(cfg, stream)
    scenes = [grammar.sample_scene(rng, n=1) for _ in range(n)]
    sized = [stream == "clip-closeup" and rng.random() < cfg.clip_closeup_sizes for _ in scenes] \
        if cfg.clip_closeup_sizes else [False] * n
    return scenes, [f"a {s[0].size + ' ' if size else ''}{s[0].colour} {s[0].shape}"
                    for s, size in zip(scenes, sized)]


TWIN_SLOTS = 10  # caption slots per swap twin pair; a cfg.clip_swap_captions share of them partial


def swap_twin(scene: grammar.Scene, rng: random.Random, resize: bool = False
              ) -> tuple[grammar.Scene, int]:
    """The scene with two objects of different shapes and colours trading shapes (or, when no two
    differ in both, one object given another shape) -> (twin, index of a changed object).
    Example: a red star left of a blue circle -> a red circle left of a blue star. resize: one
    object given another size instead (a small red star -> a large red star)."""
    if resize:
        a = rng.randrange(len(scene))
        size = rng.choice([z for z in grammar.SIZES if z != scene[a].size])
        return tuple(dataclasses.replace(o, size=size) if k == a else o
                     for k, o in enumerate(scene)), a
    pairs = [(a, b) for a in range(len(scene)) for b in range(a + 1, len(scene))
             if scene[a].shape != scene[b].shape and scene[a].colour != scene[b].colour]
    if pairs:
        a, b = rng.choice(pairs)
        shape = {a: scene[b].shape, b: scene[a].shape}
    else:
        a = rng.randrange(len(scene))
        shape = {a: rng.choice([s for s in grammar.SHAPES if s != scene[a].shape])}
    return tuple(dataclasses.replace(o, shape=shape[k]) if k in shape else o
                 for k, o in enumerate(scene)), a


def swap_twins(cfg: ShapesWorldConfig, scenes: list[grammar.Scene], captions: list[list[str]],
               tokenizer: clip_tokenizer.Tokenizer, progress: bool) -> tuple:
    """pretrain_clip's twins of the first n = cfg.n_clip_pairs // 2 pretraining scenes: their
    images (n, R, R, 3), drawn with the originals' backgrounds and noise; the twins' and the
    originals' tokens (n, TWIN_SLOTS, L), slot by slot the same kind of caption (a
    cfg.clip_swap_captions share name the changed object alone, the rest describe the whole
    scene); and the originals' rows (n,)."""
    n, rng = cfg.n_clip_pairs // 2, stream_rng(cfg, "clip-twins")
    partial = round(cfg.clip_swap_captions * TWIN_SLOTS)
    twins, twin_texts, original_texts = [], [], []

    def named(o: grammar.Obj, resized: bool) -> str:  # the changed object alone
        return f"a {o.size + ' ' if resized else ''}{o.colour} {o.shape}"

    for i in range(n):
        resize = cfg.clip_size_twins > 0 and rng.random() < cfg.clip_size_twins
        twin, a = swap_twin(scenes[i], rng, resize)
        twins.append(twin)
        twin_texts += [named(twin[a], resize)] * partial + [
            grammar.describe(twin, grammar.STYLES[k % 2], rng) for k in range(TWIN_SLOTS - partial)]
        original_texts += [named(scenes[i][a], resize)] * partial + [
            captions[i][k % len(captions[i])] for k in range(TWIN_SLOTS - partial)]
    shape = (n, TWIN_SLOTS, cfg.clip_context_length)
    return (render_all(cfg, "clip", twins, progress),  # image i keeps original i's noise
            clip_tokens(twin_texts, tokenizer, shape[2]).view(shape),
            clip_tokens(original_texts, tokenizer, shape[2]).view(shape), torch.arange(n))


# ----------------------------------------------------------------------------------------------
# Encoding: images and captions to L2-normalised embeddings


def to_clip_input(images: np.ndarray) -> torch.Tensor:
    """(N, R, R, 3) uint8 -> (N, 3, R, R) float32, the values clip_model.Preprocess gives a PIL image
    of size R (same float32 operations). The tensor keeps the pixels' channels-last memory layout
    (torch.channels_last): the ResNet's convolutions train about 1.4x faster in it on CPU. Its
    embeddings match the `caption` path's (default layout) to ~1e-5, not bit for bit."""
    x = (images.astype(np.float32) / 255.0 - clip_model.MEAN) / clip_model.STD  # (N, R, R, 3)
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)  # (N, 3, R, R) channels-last


def clip_tokens(texts: list[str], tokenizer: clip_tokenizer.Tokenizer, context_length: int) -> torch.Tensor:
    """clip_tokenizer.tokenize(texts, context_length, truncate=True) for clean captions (lowercase
    words and single spaces, as every ShapesWorld caption is): the same ids (a test checks), but
    each distinct word is encoded once instead of running ftfy on every caption, which made
    tokenizing the 100k pretraining captions take longer than rendering their images.
    texts -> (N, L) long."""
    out = np.zeros((len(texts), context_length), np.int64)  # (N, L)
    words: dict[str, list[int]] = {}
    for row, text in enumerate(texts):
        ids = [tokenizer.sot_token]
        for word in text.split():
            if word not in words:
                words[word] = tokenizer.encode(word)
            ids += words[word]
        ids = ids[:context_length - 1] + [tokenizer.eot_token]
        out[row, :len(ids)] = ids
    return torch.from_numpy(out)


@torch.no_grad()
def encode_images(model: clip_model.CLIP, images: np.ndarray, progress: bool = False,
                  chunk: int = 1000) -> torch.Tensor:
    """(N, R, R, 3) uint8 -> (N, D) L2-normalised float32 CLIP image embeddings."""
    out = [model.encode_image(to_clip_input(images[i:i + chunk])) for i in
           tqdm(range(0, len(images), chunk), desc="encode images", disable=not progress,
                leave=False)]
    return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1)  # (N, D)


@torch.no_grad()
def encode_texts(model: clip_model.CLIP, tokenizer: clip_tokenizer.Tokenizer, texts: list[str],
                 progress: bool = False, chunk: int = 2000) -> torch.Tensor:
    """Texts -> (M, D) L2-normalised float32 CLIP text embeddings."""
    out = []
    for i in tqdm(range(0, len(texts), chunk), desc="encode texts", disable=not progress,
                  leave=False):
        tokens = clip_tokens(texts[i:i + chunk], tokenizer, model.config.context_length)  # (chunk, L)
        out.append(model.encode_text(tokens))
    return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1)  # (M, D)


# ----------------------------------------------------------------------------------------------
# Contrastive pretraining with the logit-scale ramp


def clip_config(cfg: ShapesWorldConfig, vocab_size: int) -> clip_model.CLIPConfig:
    vit = cfg.clip_image_encoder == "vit"
    return clip_model.CLIPConfig(
        embed_dim=cfg.clip_embed_dim, image_resolution=cfg.image_size,
        vision_layers=cfg.clip_vision_layers if vit else (cfg.clip_vision_layers,) * 4,
        vision_width=cfg.clip_vision_width, vision_patch_size=cfg.clip_patch_size if vit else None,
        context_length=cfg.clip_context_length,
        vocab_size=vocab_size, transformer_width=cfg.clip_text_width,
        transformer_heads=cfg.clip_heads, transformer_layers=cfg.clip_text_layers,
        vision_heads=cfg.clip_heads, learn_logit_scale=cfg.clip_learn_logit_scale,
        logit_scale_init=math.log(1 / 0.07 if cfg.clip_learn_logit_scale else cfg.clip_logit_scale))


def logit_scale_at(step: int, cfg: ShapesWorldConfig) -> float:
    """The (not learned) logit scale at a pretraining step: from CLIP's initial 1/0.07 up to
    cfg.clip_logit_scale (100) geometrically over the first cfg.clip_scale_ramp of the steps, then
    fixed. From scratch, a scale of 100 at once makes the encoders collapse to constant outputs
    (random similarities cost more than the signal gains; we measured loss stuck at log B), so
    the scale ramps up as the released CLIP's learned one did; the saved model's scale is 100.
    Example: 300 steps, ramp 0.5 -> 14.3 at step 0, 37.8 at step 75, 100 from step 150.
    """
    start, end = 1 / 0.07, cfg.clip_logit_scale
    ramp = max(1, round(cfg.clip_scale_ramp * cfg.clip_steps))
    return start * (end / start) ** min(1.0, step / ramp)


def pretrain_clip(cfg: ShapesWorldConfig, images: np.ndarray, tokens: torch.Tensor,
                  vocab_size: int, progress: bool = True,
                  closeup: tuple[np.ndarray, torch.Tensor] | None = None,
                  twins: tuple | None = None, rank: int = 0) -> tuple[clip_model.CLIP, list[float]]:
    """Contrastive pretraining (clip_model.contrastive_loss) on images (N, R, R, 3) uint8 and
    tokens (N, C, L): C captions per image, one drawn at random each time the image is used.
    closeup: (images (M, R, R, 3), tokens (M, L)) single-object pairs that fill a
    cfg.clip_closeup_share of every batch. twins: swap_twins(...), when cfg.clip_swaps > 0
    (pretraining_batches). AdamW with linear warmup and cosine decay. Returns the model (eval
    mode) and the losses.
    With cfg.clip_procs = W > 1, W processes share each step (pretrain_in_processes); this is then
    the loop of process `rank`, and each process embeds every W-th row of the batch."""
    world = cfg.clip_procs
    if world > 1 and not torch.distributed.is_initialized():
        return pretrain_in_processes(cfg, images, tokens, vocab_size, progress, closeup, twins)
    torch.manual_seed(cfg.seed)
    model = clip_model.CLIP(clip_config(cfg, vocab_size))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.clip_lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)
    warmup = max(1, cfg.clip_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0.0, s - warmup) / max(1, cfg.clip_steps - warmup))))))
    batches = pretraining_batches(cfg, images, tokens, closeup, twins,
                                  torch.Generator().manual_seed(cfg.seed))
    losses = []
    model.train()
    bar = tqdm(range(cfg.clip_steps), desc="pretrain tiny CLIP", disable=not progress, leave=False)
    for step in bar:
        if not cfg.clip_learn_logit_scale:
            with torch.no_grad():
                model.logit_scale.fill_(math.log(logit_scale_at(step, cfg)))
        pixels, texts = next(batches)  # (B+B', R, R, 3), (B+B', L)
        if world == 1:
            logits, _ = model(to_clip_input(pixels), texts)  # (B+B', B+B')
        else:
            logits = sharded_logits(model, pixels, texts, rank, world)  # (B+B', B+B')
        loss = clip_model.contrastive_loss(logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:  # each process holds the gradient through its own rows; their sum: the whole
            data.sum_over_processes([p.grad for p in params])
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        if cfg.clip_learn_logit_scale:
            with torch.no_grad():  # OpenAI clamps the learned scale at 100
                model.logit_scale.clamp_(max=math.log(100))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    if not cfg.clip_learn_logit_scale:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(cfg.clip_logit_scale))
    if world > 1:  # BatchNorm's running statistics saw each process's rows: their mean
        stats = [b for b in model.buffers() if b.is_floating_point()]
        data.sum_over_processes(stats)
        for b in stats:
            b /= world
    return model.eval(), losses


def pretraining_batches(cfg: ShapesWorldConfig, images: np.ndarray, tokens: torch.Tensor,
                        closeup: tuple | None, twins: tuple | None, gen: torch.Generator):
    """pretrain_clip's batches, endless: (pixels (B+B', R, R, 3) uint8, texts (B+B', L)), B pairs
    drawn in shuffled passes over the images, each with one of its C captions at random (a
    cfg.clip_swaps share of them replaced by originals beside their swap twins), then B'
    close-ups (cfg.clip_closeup_share of the batch)."""
    batch = min(cfg.clip_batch_size, len(images))
    n_close = round(cfg.clip_closeup_share * batch) if closeup is not None else 0
    batch -= n_close  # pairs per batch; the close-ups complete it
    twin_pairs = round(cfg.clip_swaps * batch / 2) if twins is not None else 0
    order, cursor = torch.randperm(len(images), generator=gen), 0
    while True:
        if cursor + batch > len(images):
            order, cursor = torch.randperm(len(images), generator=gen), 0
        idx = order[cursor:cursor + batch]  # (B,)
        cursor += batch
        pick = torch.randint(tokens.shape[1], (batch,), generator=gen)  # (B,)
        pixels, texts = images[idx.numpy()], tokens[idx, pick]  # (B, R, R, 3), (B, L)
        if twin_pairs:
            pixels, texts = _with_twins(pixels, texts, images, twins, twin_pairs, gen)
        if n_close:
            near = torch.randint(len(closeup[0]), (n_close,), generator=gen)  # (B',)
            pixels = np.concatenate([pixels, closeup[0][near.numpy()]])  # (B+B', R, R, 3)
            texts = torch.cat([texts, closeup[1][near]])  # (B+B', L)
        yield pixels, texts


def sharded_logits(model: clip_model.CLIP, pixels: np.ndarray, texts: torch.Tensor, rank: int,
                   world: int) -> torch.Tensor:
    """The batch's logits (B, B) when W processes share it: each embeds every W-th image and text
    (rows rank, rank + W, ...: each sees pairs, twins and close-ups alike) and gathers the others'
    embeddings, its own keeping their gradient. The rows come out in the order of the processes,
    images and texts alike, so row i's caption is still column i.
    pixels (B, R, R, 3) uint8, texts (B, L) -> (B, B)."""
    image = F.normalize(model.encode_image(to_clip_input(pixels[rank::world])), dim=-1)  # (B/W, D)
    text = F.normalize(model.encode_text(texts[rank::world]), dim=-1)  # (B/W, D)
    rows = len(texts)
    image, text = _gather(image, rank, world, rows), _gather(text, rank, world, rows)  # (B, D)
    return model.logit_scale.exp() * image @ text.t()


def _gather(x: torch.Tensor, rank: int, world: int, rows: int) -> torch.Tensor:
    """Every process's rows (rows in all, process r holding rows r, r + W, ...), concatenated in
    rank order; this process's own keep their gradient. One exchange: (rows / W, D) -> (rows, D)."""
    share = -(-rows // world)  # rows of process 0, the most any holds
    padded = x.new_zeros(share, x.shape[1])
    padded[:len(x)] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    parts = [part[:len(range(r, rows, world))] for r, part in enumerate(parts)]
    parts[rank] = x
    return torch.cat(parts)


def pretrain_in_processes(cfg: ShapesWorldConfig, images: np.ndarray, tokens: torch.Tensor,
                          vocab_size: int, progress: bool, closeup: tuple | None,
                          twins: tuple | None) -> tuple[clip_model.CLIP, list[float]]:
    """pretrain_clip on cfg.clip_procs processes of cfg.threads threads each (data.in_processes,
    gloo): each step costs each of them 1/W of the work and two exchanges, so on free cores it
    runs nearly W times as fast, and beside other work it slows down like one process, not like
    threads that wait at every op. Forked workers share the images, uncopied.
    The model differs from one process's by BatchNorm: each process normalises its own rows."""
    saved = data.in_processes(_pretrain_rank, cfg.clip_procs, cfg.threads, cfg, images, tokens,
                              vocab_size, progress, closeup, twins)
    model = clip_model.CLIP(clip_config(cfg, vocab_size))
    model.load_state_dict(saved["model"])
    return model.eval(), saved["losses"]


def _pretrain_rank(cfg: ShapesWorldConfig, images, tokens, vocab_size, progress, closeup,
                   twins) -> dict:
    rank = torch.distributed.get_rank()
    model, losses = pretrain_clip(cfg, images, tokens, vocab_size, progress and rank == 0,
                                  closeup, twins, rank)
    return {"model": model.state_dict(), "losses": losses}


def _with_twins(pixels: np.ndarray, texts: torch.Tensor, images: np.ndarray, twins: tuple,
                n: int, gen: torch.Generator) -> tuple[np.ndarray, torch.Tensor]:
    """The batch's last 2n pairs replaced by n drawn twins and their originals, side by side, each
    pair captioned by its caption slot drawn once for both."""
    twin_images, twin_tokens, original_tokens, original = twins
    t = torch.randint(len(twin_images), (n,), generator=gen)  # (n,)
    pick = torch.randint(twin_tokens.shape[1], (n,), generator=gen)  # (n,)
    keep = len(pixels) - 2 * n
    pixels = np.concatenate([pixels[:keep], images[original[t].numpy()], twin_images[t.numpy()]])
    return pixels, torch.cat([texts[:keep], original_tokens[t, pick], twin_tokens[t, pick]])


# ----------------------------------------------------------------------------------------------
# Retrieval and modality-gap figures, the shape and colour probe


def retrieval_and_gap(image_feats: torch.Tensor, text_feats: torch.Tensor,
                      captions: list[str]) -> dict[str, float]:
    """Image->text retrieval of matched pairs, and the modality gap.

    image_feats, text_feats (n, D) normalised, row i a matched pair. R@k: share of images whose
    top-k texts (cosine) include one identical to their own caption (identical captions of other
    scenes count, as no retrieval could tell them apart); chance_r1 is that share for a random
    pick. gap_cos: cosine of the mean image and mean text embeddings; matched_cos: mean cosine of
    matched pairs.
    """
    sims = image_feats @ text_feats.T  # (n, n)
    top = sims.topk(min(5, len(captions)), dim=1).indices  # (n, 5)
    same = [[captions[j] == captions[i] for j in row] for i, row in enumerate(top.tolist())]
    counts: dict[str, int] = {}
    for c in captions:
        counts[c] = counts.get(c, 0) + 1
    mean_img, mean_txt = image_feats.mean(0), text_feats.mean(0)  # (D,)
    return {"n": len(captions),
            "r1": float(np.mean([s[0] for s in same])), "r5": float(np.mean([any(s) for s in same])),
            "chance_r1": float(np.mean([counts[c] / len(captions) for c in captions])),
            "gap_cos": float(torch.nn.functional.cosine_similarity(mean_img, mean_txt, dim=0)),
            "matched_cos": float((image_feats * text_feats).sum(1).mean()),
            "mean_image_norm": float(mean_img.norm()), "mean_text_norm": float(mean_txt.norm())}


PROBE_IMAGES = 600  # held-out single-object images of the shape and colour probe


def shape_and_colour_accuracy(model: clip_model.CLIP, tokenizer: clip_tokenizer.Tokenizer,
                              cfg: ShapesWorldConfig, scenes: list[grammar.Scene],
                              scene_feats: torch.Tensor) -> dict[str, float]:
    """Zero-shot reading of shapes and colours, on images the CLIP never trained on.

    shape_acc: one-object close-ups (stream "clip-probe"), share whose best caption among
    "a {true colour} {shape}" over the six shapes names the true shape (chance 1/6);
    colour_acc: the same over the eight colours with the true shape (chance 1/8);
    size_acc: the same over "a {size} {colour} {shape}" for the three sizes (chance 1/3), and
    scene_size_acc the same inside scenes, for the objects scene_shape_acc counts;
    scene_shape_acc: the shape reading inside whole scenes (scenes (n,) with image embeddings
    scene_feats (n, D), the held-out pairs): for each object whose colour no other object of its
    scene has, the share whose scene image is closest to "a {colour} {true shape}" among the six
    shapes (chance 1/6). Captions can only be faithful to the shapes of a crowded scene when this
    one is well above chance (docs/shapesworld_results.md, finding 1). Example: a red star whose
    image is closest to "a red circle" among the six red captions counts against shape_acc.
    """
    shapes, colours = list(grammar.SHAPES), list(grammar.COLOURS)
    text = encode_texts(model, tokenizer, [f"a {c} {s}" for c in colours for s in shapes])
    text = text.view(len(colours), len(shapes), -1)  # (colour, shape, D)
    probe, _ = closeups(cfg, "clip-probe", PROBE_IMAGES)
    image = encode_images(model, render_all(cfg, "clip-probe", probe, False))  # (p, D)
    sims = torch.einsum("pd,csd->pcs", image, text)  # (p, colour, shape)
    colour = torch.tensor([colours.index(s[0].colour) for s in probe])  # (p,)
    shape = torch.tensor([shapes.index(s[0].shape) for s in probe])  # (p,)
    rows = torch.arange(len(probe))
    unique = [(o, feat) for scene, feat in zip(scenes, scene_feats) for o in scene
              if sum(other.colour == o.colour for other in scene) == 1]
    hits = [shapes[int((text[colours.index(o.colour)] @ feat).argmax())] == o.shape
            for o, feat in unique]
    size_hits = _size_hits(model, tokenizer, [o for o, _ in unique], [f for _, f in unique])
    return {"shape_acc": float((sims[rows, colour].argmax(-1) == shape).float().mean()),
            "colour_acc": float((sims[rows, :, shape].argmax(-1) == colour).float().mean()),
            "scene_shape_acc": sum(hits) / max(1, len(hits)),
            "size_acc": sum(_size_hits(model, tokenizer, [s[0] for s in probe], image)) / len(probe),
            "scene_size_acc": sum(size_hits) / max(1, len(size_hits))}


def _size_hits(model: clip_model.CLIP, tokenizer: clip_tokenizer.Tokenizer, objects: list,
               feats) -> list[bool]:
    """For each object with image embedding feats[k] (D,), whether "a {size} {colour} {shape}"
    with its own colour and shape is closest to it at its true size among the three sizes."""
    if not objects:
        return []
    texts = encode_texts(model, tokenizer, [f"a {z} {o.colour} {o.shape}" for o in objects
                                            for z in grammar.SIZES])
    texts = texts.view(len(objects), len(grammar.SIZES), -1)  # (objects, size, D)
    return [grammar.SIZES[int((texts[k] @ feat).argmax())] == o.size
            for k, (o, feat) in enumerate(zip(objects, feats))]


# ----------------------------------------------------------------------------------------------
# Pretrain, save and measure: the step shapesworld.build_shapesworld runs


def pretraining_inputs(cfg: ShapesWorldConfig, pairs: tuple, tokenizer: clip_tokenizer.Tokenizer,
                       progress: bool
                       ) -> tuple[np.ndarray, torch.Tensor, tuple | None, tuple | None]:
    """What pretrain_clip reads: the pairs' images (N, R, R, 3) uint8 and tokens (N, C, L), the
    close-ups (images (M, R, R, 3) uint8, tokens (M, L)), None when cfg.clip_closeup_share is 0,
    and the swap twins (swap_twins), None when cfg.clip_swaps is 0."""
    scenes, captions = pairs
    images = render_all(cfg, "clip", scenes, progress)
    closeup = None
    if cfg.clip_closeup_share > 0:
        close_scenes, close_captions = closeups(cfg, "clip-closeup", cfg.n_clip_closeups)
        closeup = (render_all(cfg, "clip-closeup", close_scenes, progress),  # (M, R, R, 3)
                   clip_tokens(close_captions, tokenizer, cfg.clip_context_length))  # (M, L)
    unique = sorted({c for caps in captions for c in caps})
    ids = clip_tokens(unique, tokenizer, cfg.clip_context_length)  # (U, L)
    row = {c: i for i, c in enumerate(unique)}
    tokens = ids[torch.tensor([[row[c] for c in caps] for caps in captions])]  # (N, C, L)
    twins = swap_twins(cfg, scenes, captions, tokenizer, progress) if cfg.clip_swaps > 0 else None
    return images, tokens, closeup, twins


def train_clip(cfg: ShapesWorldConfig, pairs: tuple, tokenizer: clip_tokenizer.Tokenizer,
               path: Path, progress: bool) -> dict:
    """Render the pairs, pretrain and save the tiny CLIP; its metrics on the held-out pairs."""
    images, tokens, closeup, twins = pretraining_inputs(cfg, pairs, tokenizer, progress)
    n = cfg.n_clip_pairs
    model, losses = pretrain_clip(cfg, images[:n], tokens[:n], tokenizer.vocab_size, progress,
                                  closeup, twins)
    clip_model.save(model, path)
    scenes, captions = pairs
    held = [caps[0] for caps in captions[n:]]  # plain-style captions of the held-out scenes
    held_feats = encode_images(model, images[n:])  # (n_clip_heldout, D)
    metrics = retrieval_and_gap(held_feats, encode_texts(model, tokenizer, held), held)
    metrics["final_loss"] = float(np.mean(losses[-20:]))
    metrics.update(shape_and_colour_accuracy(model, tokenizer, cfg, scenes[n:], held_feats))
    return {"digest": data.file_digest(path), "metrics": metrics}
