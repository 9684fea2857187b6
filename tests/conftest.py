"""Shared pytest setup: the project root on sys.path, and the `slow` marker policy.

Slow tests run in CI (where CI=true is set) or with `--runslow`; a developer's plain
`python -m pytest` skips them so the default suite stays at a few minutes on 2 cores.
"""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("CI", "").lower() in ("1", "true"):
        return
    skip = pytest.mark.skip(reason="slow: runs in CI or with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests: OpenMP spin-waits make a shared 2-core
    machine about 100x slower on them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def openai_clip_file():
    """Loads a module of OpenAI's reference CLIP (as shipped in clip-anytorch) by path, without
    importing the package (which needs torchvision): openai_clip_file("model.py")."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.origin:
        pytest.skip("clip-anytorch is not installed (pip install --no-deps clip-anytorch)")

    def load(name: str):
        path = Path(spec.origin).parent / name
        module_spec = importlib.util.spec_from_file_location(f"openai_clip_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module

    return load
