"""Shared pytest setup: the project root on sys.path, and the `slow` marker policy.

Slow tests run in CI (where CI=true is set) or with `--runslow`; a developer's plain
`python -m pytest` skips them so the default suite stays at a few minutes on 2 cores.
"""
import os
import sys
from pathlib import Path

import pytest

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
