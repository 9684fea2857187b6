"""ShapesWorld's scenes and their pictures: the random streams of scenes, and the renderer.

CgT-GAN (Yu et al., arXiv:2308.12045) trains on unpaired images (Sec. 3.1); ShapesWorld's images
are scenes of shapes_grammar.py (1-3 coloured shapes on a 3x3 grid) drawn here with PIL. Every
split, and each of the tiny CLIP's pair, close-up and probe sets (shapes_clip.py), draws its scenes
from its own named stream of the world's seed, and image i of a stream takes its background, colour
jitter and noise from (seed, stream, i) alone, so sizes never interact and any image can be drawn
again on its own. shapesworld.py (the world's text, tokenizers and build) and shapes_clip.py (the
tiny CLIP) both import this file; it imports neither.

Shape legend: N images, R image resolution.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import random

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

import data
import shapes_grammar as grammar
from config import ShapesWorldConfig

# ----------------------------------------------------------------------------------------------
# Scenes, one random stream per split


def stream_rng(cfg: ShapesWorldConfig, stream: str) -> random.Random:
    """Each split (and each of shapes_clip's pair, close-up and probe sets) draws from its own
    stream, so splits are independent and sizes do not interact."""
    return random.Random(f"shapesworld/{cfg.seed}/{stream}")


def make_scenes(cfg: ShapesWorldConfig, stream: str, n: int) -> list[grammar.Scene]:
    """The first n scenes of a stream (a larger n extends the list; it never changes its start)."""
    rng = stream_rng(cfg, stream)
    return [grammar.sample_scene(rng) for _ in range(n)]


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


RENDER_CHUNK = 250  # images per task of the rendering processes


def render_processes(cfg: ShapesWorldConfig) -> int:
    """cfg.render_procs, or one per CPU core (at most 4) when it is 0."""
    return cfg.render_procs or min(4, os.cpu_count() or 1)


def _render_chunk(task: tuple) -> tuple[int, np.ndarray]:
    """(seed, salt, R, first index, scenes) -> (first index, their images (n, R, R, 3) uint8)."""
    seed, salt, size, start, scenes = task
    return start, np.stack([render(scene, size, np.random.default_rng([seed, salt, start + k]))
                            for k, scene in enumerate(scenes)])


def render_all(cfg: ShapesWorldConfig, stream: str, scenes: list, progress: bool) -> np.ndarray:
    """Images of a split (N, R, R, 3) uint8; image i's noise comes from (seed, stream, i) alone, so
    the render_processes(cfg) processes that draw chunks of RENDER_CHUNK images give the same
    pixels as one."""
    out = np.empty((len(scenes), cfg.image_size, cfg.image_size, 3), np.uint8)  # (N, R, R, 3)
    salt = int(data.cache_key(stream=stream)[:8], 16)
    tasks = [(cfg.seed, salt, cfg.image_size, i, scenes[i:i + RENDER_CHUNK])
             for i in range(0, len(scenes), RENDER_CHUNK)]
    procs = min(render_processes(cfg), len(tasks))
    with tqdm(total=len(scenes), desc=f"render {stream}", disable=not progress, leave=False) as bar:
        if procs <= 1:
            chunks = map(_render_chunk, tasks)
        else:  # fork where the system has it: the workers need no imports of their own
            methods = multiprocessing.get_all_start_methods()
            pool = multiprocessing.get_context("fork" if "fork" in methods else "spawn").Pool(procs)
            chunks = pool.imap_unordered(_render_chunk, tasks)
        try:
            for start, images in chunks:
                out[start:start + len(images)] = images
                bar.update(len(images))
        finally:
            if procs > 1:
                pool.terminate()
    return out
