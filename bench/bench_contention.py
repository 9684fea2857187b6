"""How the default run shares the CPU: its speed alone, and beside one other CPU-bound process.

    python bench/bench_contention.py                       # busy-loop competitor, default settings
    python bench/bench_contention.py --competitor torch    # a torch job on every core instead
    python bench/bench_contention.py --threads 2           # the same with 2 torch threads (worse)
    python bench/bench_contention.py --procs 2             # the run on 2 one-thread processes

Two measurements, each made alone and then with a competitor that this benchmark starts and stops
itself (a pure-Python busy loop, or a torch matrix-multiply loop on torch's default thread count,
as another training job would be):
- the tiny CLIP's pretraining steps, the stage that dominates building the world
  (bench_shapes.clip_step_seconds, on world.threads threads);
- a shortened default run, `python cgtgan.py train` with the world cached, its text-only
  initialisation and CgT-GAN stages cut to a few dozen steps (wall time of the whole command).
It prints the seconds of each and the ratio "with competitor / alone"; the goal is at most 2x.
Why it can be much worse: a torch op split over 2 threads waits at a barrier for the slower
thread, and on a 2-core machine with a competitor one of them is often descheduled.
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_shapes  # noqa: E402
import shapesworld as sw  # noqa: E402

COMPETITORS = {
    "busy": "while True: pass",
    "torch": "import torch\nx = torch.randn(512, 512)\nwhile True: x = torch.tanh(x @ x / 512)",
}


@contextmanager
def competitor(kind: str | None):
    """Run one competitor process for the duration of the block (none when kind is None)."""
    process = None if kind is None else subprocess.Popen([sys.executable, "-c", COMPETITORS[kind]])
    try:
        time.sleep(0.5 if process else 0)  # let it start
        yield
    finally:
        if process:
            process.kill()
            process.wait()


def short_run_seconds(threads: int, runs_dir: str, init_steps: int, gan_steps: int,
                      procs: int = 1) -> float:
    """Wall seconds of `python cgtgan.py train` (the default world, cached) with short stages, on
    `procs` data-parallel processes (Config.procs)."""
    command = [sys.executable, str(ROOT / "cgtgan.py"), "train", "--overwrite", "--name", "bench",
               "--set", f"runs_dir={runs_dir}", "--set", f"threads={threads}",
               "--set", f"procs={procs}",
               "--set", f"world.threads={threads}", "--set", f"init.steps={init_steps}",
               "--set", f"gan.steps={gan_steps}", "--set", f"gan.eval_every={gan_steps}"]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--competitor", choices=sorted(COMPETITORS), default="busy")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the run and of the world build (the default is 1)")
    parser.add_argument("--procs", type=int, default=1,
                        help="processes of the short run and of the CLIP pretraining (procs and "
                             "world.clip_procs; the defaults are 1)")
    parser.add_argument("--clip-steps", type=int, default=15)
    parser.add_argument("--init-steps", type=int, default=100)
    parser.add_argument("--gan-steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print("building or loading the default world first (not timed)...", flush=True)
    sw.build_shapesworld(sw.ShapesWorldConfig(), progress=False)
    cfg = sw.ShapesWorldConfig(n_clip_pairs=512, n_clip_heldout=1, n_clip_closeups=256)
    setting = (args.procs, args.threads)  # the pretraining's processes and threads, as the run's
    bench_shapes.clip_step_seconds(cfg, [setting], 0, 3, 1)  # warm-up, not counted
    times: dict[str, list[tuple[float, float]]] = {"alone": [], "beside": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # alternated, so drift and warm-up weigh on both alike
            for name, kind in (("alone", None), ("beside", args.competitor)):
                with competitor(kind):
                    clip = bench_shapes.clip_step_seconds(cfg, [setting], 0, args.clip_steps, 1)
                    run = short_run_seconds(args.threads, tmp, args.init_steps, args.gan_steps,
                                            args.procs)
                times[name].append((clip[setting][0], run))
    (clip_alone, run_alone), (clip_busy, run_busy) = (
        [statistics.median(column) for column in zip(*times[name])] for name in ("alone", "beside"))
    print(f"{args.threads} torch thread(s), the run on {args.procs} process(es); competitor: one '{args.competitor}' process; "
          f"medians of {args.repeats} alternated measurements")
    print(f"  {'':38s} {'alone':>8s} {'beside it':>10s} {'ratio':>6s}")
    print(f"  {'tiny-CLIP pretraining, s/step':38s} {clip_alone:8.3f} {clip_busy:10.3f} "
          f"{clip_busy / clip_alone:5.2f}x")
    print(f"  {f'short default run ({args.init_steps}+{args.gan_steps} steps), s':38s} "
          f"{run_alone:8.1f} {run_busy:10.1f} {run_busy / run_alone:5.2f}x")


if __name__ == "__main__":
    main()
