"""Shared fixtures: small synthetic datasets in their real on-disk layouts, and the gpu marker."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
# The auto pipeline backend stores its first-use probe in the user's cache folder: keep tests out of it.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="rrd-fast-test-cache-")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
