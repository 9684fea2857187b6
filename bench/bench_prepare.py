"""Benchmark: CLIP-agg targets for 20,000 images x 200,000 sentences at width 768.

Ours (data.clip_agg_targets: corpus chunks outer, image chunks inner, online softmax, float32)
against a straightforward per-image float64 loop like the official preprocessing's
(for each image: sims = corpus @ image; softmax(t * sims); weighted sum of the corpus), which is
run on the first 200 images only and its time scaled to all images. Both see the same random unit
vectors (fixed seed, stored fp16 as `prepare` stores them). Each method runs in its own child
process so that its peak memory is its own:

  peak memory (MB = 10^6 bytes) = the highest resident set size (RSS, polled from /proc/self/statm every 5 ms)
                during the computation, minus the RSS just before it (after the inputs exist).
                It counts everything the method allocates, torch's buffers included (which
                tracemalloc would miss).

Usage: python bench/bench_prepare.py [--images 20000] [--sentences 200000] [--dim 768]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def unit_vectors(rows: int, dim: int, seed: int, chunk: int = 20000) -> np.ndarray:
    """(rows, dim) fp16 random unit vectors, generated chunk by chunk to bound memory."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, dim), np.float16)
    for start in range(0, rows, chunk):
        x = rng.standard_normal((min(chunk, rows - start), dim), dtype=np.float32)
        out[start: start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak RSS above the starting RSS while the block runs (a polling thread)."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.delta = self.peak - self.start


def reference_loop(images: np.ndarray, corpus: np.ndarray, t: float) -> np.ndarray:
    """The per-image float64 loop (the official preprocessing's approach), images (n, D)."""
    corpus = corpus.astype(np.float64)  # (M, D)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    out = np.empty((len(images), corpus.shape[1]))
    for i, image in enumerate(images.astype(np.float64)):
        sims = corpus @ (image / np.linalg.norm(image))  # (M,)
        weights = np.exp(t * sims - t * sims.max())
        out[i] = weights @ corpus / weights.sum()  # (D,)
    return out


def run_phase(args) -> None:
    """One method in this process: print its figures as JSON, save its first rows to args.out."""
    import torch

    import data

    torch.set_num_threads(args.threads or torch.get_num_threads())
    images = unit_vectors(args.images, args.dim, args.seed)
    corpus = unit_vectors(args.sentences, args.dim, args.seed + 1)
    with PeakRSS() as mem:
        start = time.perf_counter()
        if args.phase == "ours":
            result = data.clip_agg_targets(images, corpus, args.t, args.image_chunk,
                                           args.corpus_chunk, progress=True).numpy()
        else:
            result = reference_loop(images[: args.ref_images], corpus, args.t)
        seconds = time.perf_counter() - start
    np.save(args.out, result[: args.ref_images])
    print(json.dumps({"seconds": seconds, "rows": len(result), "peak_bytes": mem.delta,
                      "threads": torch.get_num_threads()}))


def child(args, phase: str, out: str) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--out", out] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
        if k not in ("phase", "out") and v is not None]
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--sentences", type=int, default=200000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--ref-images", type=int, default=200)
    parser.add_argument("--t", type=float, default=100.0)
    parser.add_argument("--image-chunk", type=int, default=2048)
    parser.add_argument("--corpus-chunk", type=int, default=16384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--phase", choices=["ours", "reference"], default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.phase:
        return run_phase(args)

    n, m, d, bi, bj = args.images, args.sentences, args.dim, args.image_chunk, args.corpus_chunk
    print(f"CLIP-agg targets: {n:,} images x {m:,} sentences, D = {d}, t = {args.t}, "
          f"chunks {bi} x {bj}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        ours = child(args, "ours", f"{tmp}/ours.npy")
        ref = child(args, "reference", f"{tmp}/ref.npy")
        diff = np.abs(np.load(f"{tmp}/ours.npy") - np.load(f"{tmp}/ref.npy")).max()
    ref_scaled = ref["seconds"] * n / ref["rows"]
    bound = 4 * n * (d + 2) + 4 * bi * bj + 6 * bj * d + 16 * bi * d
    rows = [("ours: chunked online softmax, float32", n, ours["seconds"], ours["seconds"],
             ours["peak_bytes"]),
            ("per-image float64 loop (official-like)", ref["rows"], ref["seconds"], ref_scaled,
             ref["peak_bytes"])]
    print(f"\n| method | images run | time (s) | time for {n:,} images (s) | peak memory (MB) |")
    print("|---|---:|---:|---:|---:|")
    for name, rows_run, sec, full, peak in rows:
        print(f"| {name} | {rows_run:,} | {sec:.1f} | {full:.1f} | {peak / 1e6:.0f} |")
    print(f"\nspeed-up: {ref_scaled / ours['seconds']:.1f}x (reference time scaled from "
          f"{ref['rows']} images); torch threads: {ours['threads']}")
    print(f"max |ours - reference| on the first {ref['rows']} images: {diff:.2e}")
    print(f"memory bound of ours, 4N(D+2) + 4*bi*bj + 6*bj*D + 16*bi*D = {bound / 1e6:.0f} MB "
          "(tensors only: inputs, BLAS workspace and allocator slack excluded)")
    coco = 4 * 113287 * (768 + 2) + 4 * bi * bj + 6 * bj * 768 + 16 * bi * 768
    print(f"same bound for COCO, 113,287 images x any number of sentences at D = 768: "
          f"{coco / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
