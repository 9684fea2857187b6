"""cgtgan.py's command line inside a one-process torch.distributed group (NCCL on a GPU, gloo on
the CPU).

train.py joins a process group only when torchrun starts several processes (WORLD_SIZE > 1), so
`torchrun --nproc_per_node 1 cgtgan.py train` runs without one. This wrapper joins a group of one
first; runs.build_run then marks the run distributed, and one GPU runs the data-parallel path of
a multi-GPU run (train.update's NCCL all-reduce of the gradients, barriers).

    torchrun --nproc_per_node 1 bench/ddp_single.py train --preset coco --set bf16=true ...
    python bench/ddp_single.py train ...      # also without torchrun: a group of one on port 29511
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli  # noqa: E402
import data  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511"), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    device = data.pick_device("auto")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        code = cli.main(argv)
        print(f"process group: {torch.distributed.get_backend()}, "
              f"{torch.distributed.get_world_size()} process(es), exit code {code}")
    finally:
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
