"""tools/bench.py: the usual pipeline reads the same faces as ours, the PReLU swap changes only
the kernel, ours trains with run.py's settings, and a tiny run writes a complete JSON with finite,
positive numbers. No timing thresholds: speeds are measured by the tool, not asserted here."""
import json
import math

import pytest
import torch

import dataset
import models
import synthetic
import train
from tools import bench
from utils import UserError


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    return synthetic.write_synthetic_csv(str(folder / "tiny.csv"), n_train=160, n_val=40,
                                         n_test=8, seed=3)


def test_usual_dataset_decodes_the_same_faces(tiny_csv):
    data = dataset.load_fer2013(tiny_csv)
    for split, usage in dataset.SPLITS.items():
        images, labels = data.split(split)
        usual = bench.UsualFerDataset(tiny_csv, usage, bench.usual_transforms(training=False))
        assert len(usual) == len(labels)
        for i in range(len(usual)):
            x, y = usual[i]
            # ToTensor of the PIL image is exactly our uint8 / 255
            assert x.shape == (1, 48, 48) and x.dtype == torch.float32
            assert torch.equal(x[0], torch.from_numpy(images[i]).float().div(255))
            assert y == labels[i]


def test_our_evaluation_equals_the_usual_one_face_at_a_time(tiny_csv):
    """train.evaluate over dataset.Batches on a channels-last model = the model on each face alone."""
    data = dataset.load_fer2013(tiny_csv)
    images, labels = data.split("val")
    torch.manual_seed(0)
    model = models.FerNet("vgg2_0_2").eval()
    usual = bench.UsualFerDataset(tiny_csv, "PublicTest", bench.usual_transforms(training=False))
    with torch.no_grad():
        logits = torch.cat([model(usual[i][0][None]) for i in range(len(usual))])
    want_loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(labels)).item()
    want_acc = (logits.argmax(1).numpy() == labels).mean()
    loss, acc = train.evaluate(model.to(memory_format=torch.channels_last),
                               dataset.Batches(images, labels, 16, "cpu", shuffle=False))
    assert loss == pytest.approx(want_loss, rel=1e-5) and acc == pytest.approx(want_acc)


def test_use_torch_prelu_swaps_every_prelu_and_keeps_the_numbers():
    torch.manual_seed(0)
    fast = models.FerNet("vgg2_4_ilrb_2")
    with torch.no_grad():
        for m in fast.modules():
            if isinstance(m, models.PReLU):
                m.weight.uniform_(0.1, 0.4)
    plain = models.FerNet("vgg2_4_ilrb_2")
    plain.load_state_dict(fast.state_dict())
    before = bench.prelu_count(plain)
    swapped = bench.use_torch_prelu(plain)
    assert before == {"models.PReLU": swapped} and swapped == 9  # 4 blocks x 2 + the classifier
    assert bench.prelu_count(plain) == {"torch.nn.modules.activation.PReLU": swapped}
    assert list(plain.state_dict()) == list(fast.state_dict())
    x = torch.rand(4, 1, 48, 48)
    grads = []
    for model in (fast, plain):
        model.eval()  # no dropout: the two must see the same computation
        model.zero_grad()
        model(x).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_ours_trains_with_run_py_settings(tiny_csv):
    """In this process, so the variant that leaves the process-wide memory setting alone."""
    spec = {"model": "vgg2_0_2", "variant": "no_reuse", "dataset": tiny_csv, "device": "cpu",
            "amp": False, "threads": 1, "steps": 2, "warmup": 1, "eval_images": 24}
    threads = torch.get_num_threads()
    try:
        r = bench.measure_ours(spec)
    finally:
        torch.set_num_threads(threads)
    # run.py's defaults: batch 128, Nesterov SGD, channels-last, a weight average, fp32
    assert (r["batch_size"], r["optimizer"], r["channels_last"], r["ema_decay"], r["amp_dtype"]) == (
        128, "SGD", True, 0.999, None)
    assert r["reuse_freed_memory"] is False and r["prelu_modules"] == {"models.PReLU": 1}
    # the timed steps: the last batch of the 160 training faces (32), then the first of epoch 2
    assert r["train_images"] == 32 + 128 and r["eval_images"] == 24
    for key in ("train_img_s", "train_seconds", "eval_img_s", "eval_seconds", "train_loss", "eval_loss"):
        assert math.isfinite(r[key]) and r[key] > 0, key


def test_usual_pipeline_measures(tiny_csv):
    spec = {"model": "vgg2_0_2", "variant": "usual", "dataset": tiny_csv, "device": "cpu",
            "threads": 1, "steps": 1, "warmup": 1, "eval_images": 8}
    threads = torch.get_num_threads()
    try:
        r = bench.measure_usual(spec)
    finally:
        torch.set_num_threads(threads)
    assert r["train_images"] == 2 * 16 and r["eval_images"] == 8 and r["batch_size"] == 16
    for key in ("train_img_s", "eval_img_s", "data_load_s"):
        assert math.isfinite(r[key]) and r[key] > 0, key


def test_main_measures_each_variant_in_a_child_and_writes_the_report(tiny_csv, tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.chdir(tmp_path)  # the children must find the project's modules from anywhere
    out = tmp_path / "bench.json"
    assert bench.main(["-d", tiny_csv, "--models", "vgg2_0_2", "--steps", "1", "--warmup", "1",
                       "--eval_images", "16", "--compare_reuse", "--compare_prelu", "--skip_usual",
                       "--threads", "1", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"section", "command", "machine", "settings", "dataset", "runs", "models", "seconds"} <= set(report)
    assert report["command"][:2] == ["python3", "tools/bench.py"]
    for key in ("cpu", "cores", "torch", "date", "load_average_at_start", "load_average_at_end"):
        assert report["machine"][key]
    runs = {r["variant"]: r for r in report["runs"]}
    assert sorted(runs) == ["no_reuse", "ours", "torch_prelu"]
    assert runs["ours"]["reuse_freed_memory"] is True and runs["no_reuse"]["reuse_freed_memory"] is False
    assert runs["torch_prelu"]["reuse_freed_memory"] is True
    assert runs["ours"]["prelu_modules"] == {"models.PReLU": 1}
    assert runs["torch_prelu"]["prelu_modules"] == {"torch.nn.modules.activation.PReLU": 1}
    entry = report["models"]["vgg2_0_2"]
    assert entry["gflop_per_image"] > 0
    for variant, v in entry["variants"].items():
        assert len(v["train_img_s_runs"]) == 1
        for key in ("train_img_s", "eval_img_s", "train_gflop_s"):
            assert math.isfinite(v[key]) and v[key] > 0, (variant, key)
    for variant in ("no_reuse", "torch_prelu"):
        ratios = entry[f"ours_vs_{variant}"]
        values = [ratios["train"], ratios["eval"], ratios["train_per_repeat_median"], *ratios["train_per_repeat"]]
        assert len(ratios["train_per_repeat"]) == 1 and all(math.isfinite(x) and x > 0 for x in values)
    printed = capsys.readouterr().out
    assert "| vgg2_0_2 | no_reuse |" in printed and "| vgg2_0_2 | torch_prelu |" in printed


def test_summary_takes_medians_and_ratios():
    runs = [{"model": "m", "variant": v, "repeat": r, "train_img_s": t, "eval_img_s": e}
            for v, r, t, e in [("ours", 0, 10, 100), ("ours", 1, 30, 300), ("ours", 2, 20, 200),
                               ("no_reuse", 0, 5, 50), ("no_reuse", 1, 15, 150), ("no_reuse", 2, 20, 100)]]
    entry = bench.summarise(runs, {"m": 2.0})["m"]
    assert entry["variants"]["ours"]["train_img_s"] == 20 and entry["variants"]["ours"]["train_gflop_s"] == 120
    assert entry["ours_vs_no_reuse"] == {"train": 20 / 15, "eval": 2.0, "train_per_repeat": [2.0, 2.0, 1.0],
                                         "train_per_repeat_median": 2.0}
    assert "ours_vs_torch_prelu" not in entry
    assert ("| m | no_reuse | 15.0 | 5.0 15.0 20.0 | 100.0 | 90.0 | 1.33x | 2.00 2.00 1.00 (2.00x) | 2.00x |"
            in bench.table(bench.summarise(runs, {"m": 2.0})))


def test_other_sections_are_their_own_scripts(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "TOOLS", str(tmp_path))
    with pytest.raises(UserError, match="tools/bench_video.py, which is not written yet"):
        bench.main(["--section", "video"])
    (tmp_path / "bench_onnx.py").write_text(
        "import sys\nopen(sys.argv[1], 'w').write(' '.join(sys.argv[2:]))\nsys.exit(3)\n")
    seen = tmp_path / "argv.txt"
    assert bench.main([str(seen), "--section", "onnx", "--models", "vgg2_0_2"]) == 3
    assert seen.read_text() == "--models vgg2_0_2"


def test_bad_counts_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="at least 1"):
        bench.main(["--steps", "0", "--out", str(tmp_path / "x.json")])
