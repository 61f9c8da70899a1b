"""Shared test set-up: the project's flat modules are importable from the repo root."""
import errno
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


@pytest.fixture
def read_only(monkeypatch):
    """read_only(folder): writes inside `folder` fail from now on as on a read-only file system
    (the tests run as root, where chmod does not stop a write)."""
    import builtins

    def make(folder):
        folder = os.path.abspath(folder)

        def refuse(real, writes):
            def call(path, *args, **kwargs):
                if (isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(folder)
                        and writes(args, kwargs)):
                    raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
                return real(path, *args, **kwargs)
            return call
        monkeypatch.setattr(os, "open", refuse(os.open, lambda a, k: (a[0] if a else k["flags"])
                                               & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
        monkeypatch.setattr(os, "mkdir", refuse(os.mkdir, lambda a, k: True))
        monkeypatch.setattr(builtins, "open", refuse(builtins.open, lambda a, k: any(
            c in (a[0] if a else k.get("mode", "r")) for c in "wax+")))
    return make


@pytest.fixture
def interrupt_annotate(monkeypatch):
    """interrupt_annotate(module, n): the n-th call of module.annotate raises KeyboardInterrupt,
    as a Ctrl-C while that picture is drawn would."""
    def make(module, n):
        real, calls = module.annotate, []

        def annotate(image, faces, legend=True):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(image, faces, legend)
        monkeypatch.setattr(module, "annotate", annotate)
    return make


@pytest.fixture
def fold_teacher():
    """fold_teacher(source, destination, fold, folds, csv): a copy of the checkpoint `source` that
    says it was trained without fold `fold` of `folds` of the training faces of `csv` (what
    run.py --hold_out writes into its args), its output biases shifted by the fold so that each
    fold's teacher answers differently."""
    import torch
    import dataset

    def make(source, destination, fold, folds, csv):
        ckpt = torch.load(source, weights_only=True)
        images, labels = dataset.load_fer2013(csv, log=lambda *a: None).split("train")
        ckpt["args"] = dict(ckpt.get("args", {}), hold_out=[fold, folds],
                            hold_out_sha256=dataset.folds_sha256(images, labels, folds))
        for weights in (ckpt.get("model_state"), ckpt.get("ema_state")):
            if weights:
                weights["classifier.4.bias"] = weights["classifier.4.bias"] + fold
        torch.save(ckpt, destination)
        return str(destination)
    return make
