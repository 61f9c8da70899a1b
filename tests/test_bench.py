"""bench.py: the usual pipeline it compares against reads the same faces, our fast path computes
what the usual one does, and a tiny run writes a complete JSON. No timed assertions."""
import json

import numpy as np
import pytest
import torch

import bench
import dataset
import infer
import synthetic
from models import FerNet


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    return synthetic.write_synthetic_csv(str(folder / "tiny.csv"), n_train=64, n_val=32,
                                         n_test=8, seed=3)


@pytest.fixture
def one_thread():
    """Batch-1 inference with several threads crawls when other work holds the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_usual_dataset_decodes_the_same_faces(tiny_csv):
    data = dataset.load_fer2013(tiny_csv)
    for split, usage in dataset.SPLITS.items():
        images, labels = data.split(split)
        usual = bench.UsualFerDataset(tiny_csv, usage, bench.usual_transforms(training=False))
        assert len(usual) == len(labels)
        for i in range(len(usual)):
            assert np.array_equal(usual.face(usual.data.iloc[i]["pixels"]), images[i])
            x, y = usual[i]
            # ToTensor of the PIL image is exactly our uint8 / 255
            assert x.shape == (1, 48, 48) and x.dtype == torch.float32
            assert torch.equal(x[0], torch.from_numpy(images[i]).float().div(255))
            assert y == labels[i]


def test_usual_training_items(tiny_csv):
    usual = bench.UsualFerDataset(tiny_csv, "Training", bench.usual_transforms(training=True))
    loader = torch.utils.data.DataLoader(usual, batch_size=16, shuffle=True, num_workers=0)
    x, y = next(iter(loader))
    assert x.shape == (16, 1, 48, 48) and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64 and y.min() >= 0 and y.max() <= 6


def test_fast_eval_equals_the_usual_batch_of_one(tiny_csv, one_thread):
    """infer.predict in batches of 512 on a channels-last model = the model on each face alone."""
    data = dataset.load_fer2013(tiny_csv)
    images = data.split("val")[0][:16]
    torch.manual_seed(0)
    model = FerNet("vgg2_2_2").eval()
    fast = infer.predict(model.to(memory_format=torch.channels_last), images, batch_size=512)
    usual = bench.UsualFerDataset(tiny_csv, "PublicTest", bench.usual_transforms(training=False))
    model = model.to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        slow = np.concatenate([torch.softmax(model(usual[i][0][None]), 1).double().numpy()
                               for i in range(len(images))])
    np.testing.assert_allclose(fast, slow, atol=1e-5)


def test_timed_batches_yield_what_batches_yields():
    """The timing wrapper hands fit the same slices train.Batches gives, across epochs."""
    import train
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 48, 48)
    labels = torch.arange(10) % 7
    inner = train.Batches(images, labels, 4, seed=1)
    timed = bench.TimedBatches(inner, warmup=2, steps=3, device=torch.device("cpu"))
    got = list(timed.epoch(0))
    want = list(inner.epoch(0)) + list(inner.epoch(1))
    assert len(got) == len(timed) == 6
    for (i, x, y), (_, wx, wy) in zip(got, want):
        assert torch.equal(x, wx) and torch.equal(y, wy)
    assert timed.images == sum(len(y) for _, _, y in got[2:5])
    t0, t1 = timed.window
    assert t1 >= t0


def test_main_writes_the_report(tiny_csv, tmp_path, capsys):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    code = bench.main(["-d", tiny_csv, "--models", "vgg2_0_2", "--steps", "1", "--warmup", "1",
                       "--eval_images", "32", "--matmul_size", "256", "--skip_startup", "--threads", "1",
                       "--device", "cpu", "--out", str(out)])
    assert code == 0
    assert torch.get_num_threads() == threads  # main gives back the thread count it changed
    report = json.loads(out.read_text())
    assert {"machine", "settings", "ceiling", "ceiling_fp32", "data_load", "dataset", "models",
            "goals", "usual_pipeline", "our_pipeline", "seconds"} <= set(report)
    for key in ("cpu", "cores", "torch", "torch_threads", "device", "date"):
        assert report["machine"][key]
    assert report["ceiling"]["gflop_s"] == max(report["ceiling_at_start"]["gflop_s"],
                                               report["ceiling_at_end"]["gflop_s"]) > 0
    d = report["data_load"]
    assert d["ours_cold_s"] > 0 and d["ours_cached_s"] > 0 and d["usual_per_start_s"] > 0
    assert set(d["usual_read_s"]) == {"train", "val", "test"}
    r = report["models"]["vgg2_0_2"]
    assert r["gflop_per_image"] > 0 and r["train_ratio"] > 0 and r["eval_ratio"] > 0
    for side in ("ours", "usual"):
        for key in ("train_img_s", "train_gflop_s", "train_pct_of_ceiling", "eval_img_s",
                    "eval_gflop_s", "train_images", "eval_images"):
            assert r[side][key] > 0, (side, key)
    assert r["ours"]["eval_images"] == r["usual"]["eval_images"] == 32
    assert r["ours"]["batch_size"] == 128 and r["usual"]["batch_size"] == 16
    assert {g["goal"].split()[0] for g in report["goals"]} == {"vgg2_0_2"}
    printed = capsys.readouterr().out
    assert "| vgg2_0_2 |" in printed and "ceiling:" in printed


def test_startup_reaches_the_first_step(tiny_csv):
    dataset.load_fer2013(tiny_csv)  # cached, as the benchmark has it
    result = bench.measure_startup(tiny_csv, "cpu", threads=1, timeout=120, runs=2)
    assert result["error"] is None and len(result["runs"]) == 2
    assert 0 < result["loop_start_seconds"] < result["seconds"]


def test_startup_failure_is_reported(tmp_path):
    result = bench.measure_startup(str(tmp_path / "missing.csv"), "cpu", threads=1, timeout=60)
    assert result["seconds"] is None and "no dataset" in result["error"]
