"""Shared test set-up: the project's flat modules are importable from the repo root."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test decodes CSVs into its own cache folder, never into the project's data/cache."""
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def one_thread():
    """Small batches on a shared 2-core machine: one thread (PyTorch's, and onnxruntime's, which
    follows it) avoids threads waiting for each other, up to 30x faster here."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
