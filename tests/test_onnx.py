"""ONNX export (infer.py --export FILE.onnx) and inference through onnxruntime (--checkpoint
FILE.onnx): same probabilities as PyTorch, any batch size, clear errors (all on made-up faces)."""
import importlib.util
import json
import os
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import checkpoint
import models
import onnx_model
import synthetic
import utils
import predict
from test_infer import run_cli, save_checkpoint

needs_onnx = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnxscript", "onnx")),
    reason="the optional onnx, onnxscript and onnxruntime packages are not installed "
           "(pip install -r requirements-dev.txt)")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def faces():
    return synthetic.make_faces(np.arange(12) % 7, np.random.default_rng(7))


def lively_model(name, faces, seed=0):
    """A random model whose answers differ from face to face, as a trained one's do (a freshly
    initialised model answers ~1/7 for everything, which would make comparing probabilities say
    little): BatchNorm statistics measured on `faces`, so every layer's output varies across them,
    and the last layer scaled (~30x) so the logits spread by ~3."""
    torch.manual_seed(seed)
    model = models.FerNet(name)
    x = torch.from_numpy(faces).float().div(255).unsqueeze(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # the plain average of what it sees
    with torch.no_grad():
        model.train()(x)
        logits = model.eval()(x)
        last = model.classifier[-1]
        scale = 3.0 / logits.std(0).mean()
        last.weight.mul_(scale)  # the new logits: (old - their mean over the faces) * scale
        last.bias.sub_(logits.mean(0)).mul_(scale)
    return model


# ----------------------------------------------------------------------------- same answers

@needs_onnx
@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_onnx_probabilities_match_pytorch_at_batch_1_and_5(name, faces, tmp_path):
    model = lively_model(name, faces)
    source = save_checkpoint(tmp_path / f"{name}.pth", model)
    path = checkpoint.export(source, str(tmp_path / f"{name}.onnx"))
    ort_model = predict.load_models(path)[0]
    assert isinstance(ort_model, onnx_model.OnnxModel) and ort_model.name == name
    batch = ort_model.session.get_inputs()[0].shape[0]
    assert isinstance(batch, str), f"the batch dimension is fixed at {batch}"
    expected = predict.predict([model], faces)
    assert expected.std(0).mean() > 0.05  # the answers differ between faces: a telling comparison
    for batch_size in (1, 5):
        got = predict.predict([ort_model], faces, batch_size=batch_size)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    # The normalisation is inside: raw [0, 1] faces in, the model's own logits out.
    x = torch.from_numpy(faces[:3]).float().div(255).unsqueeze(1)
    with torch.no_grad():
        np.testing.assert_allclose(ort_model(x).numpy(), model(x).numpy(), atol=1e-4, rtol=0)


@needs_onnx
def test_report_and_photos_through_an_onnx_checkpoint(faces, tmp_path, capsys):
    model = lively_model("vgg2_0_2", faces, seed=3)
    source = save_checkpoint(tmp_path / "small_best.pth", model, dataset="somewhere/faces.csv")
    exported = tmp_path / "small.onnx"
    code, stdout, err = run_cli(["-c", source, "--export", str(exported)], capsys)
    assert code == 0, err
    assert "ONNX, opset 18" in stdout and exported.stat().st_size > 1_000_000
    assert onnx_model.OnnxModel(exported).metadata["dataset"] == "faces.csv"  # no machine paths

    csv = synthetic.write_synthetic_csv(tmp_path / "faces.csv", 14, 7, 21, seed=5)
    tables = {}
    for ckpt in (source, str(exported)):
        out = tmp_path / ckpt.rsplit(".", 1)[1]
        code, stdout, err = run_cli(["-c", ckpt, "-d", csv, "-o", str(out), "--num_save", "4",
                                     "--device", "cpu", "--tta", "flip", "--no-amp"], capsys)
        assert code == 0, err
        saved = json.loads((out / "metrics.json").read_text())
        assert saved["models"] == ["vgg2_0_2"] and saved["n"] == 21
        tables[ckpt] = pd.read_csv(out / "predictions.csv")
    assert "ONNX through onnxruntime" in stdout
    columns = [f"p_{n}" for n in utils.EMOTIONS]
    np.testing.assert_allclose(tables[str(exported)][columns], tables[source][columns], atol=1e-4)

    # An ensemble may mix an ONNX file and a PyTorch checkpoint; photos work the same.
    folder = tmp_path / "crops"
    folder.mkdir()
    import cv2
    for i in range(2):
        cv2.imwrite(str(folder / f"face{i}.png"), faces[i])
    code, _, err = run_cli(["-c", str(exported), source, "--images", str(folder), "--no-detect",
                            "-o", str(tmp_path / "photos"), "--device", "cpu", "--no-amp"], capsys)
    assert code == 0, err
    got = pd.read_csv(tmp_path / "photos" / "faces.csv")[columns].to_numpy()
    np.testing.assert_allclose(got, predict.predict([model], faces[:2]), atol=1e-4)


# ----------------------------------------------------------------------------- clear errors

def test_missing_onnxruntime_is_a_clear_error(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"not read: onnxruntime is missing")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now fails
    code, _, err = run_cli(["-c", str(fake), "--images", str(tmp_path)], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "pip install onnxruntime" in err and "optional" in err


def test_export_without_the_exporter_is_a_clear_error(tmp_path, monkeypatch, capsys):
    source = save_checkpoint(tmp_path / "a.pth", models.FerNet("vgg2_0_2"))
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    code, _, err = run_cli(["-c", source, "--export", str(tmp_path / "a.onnx")], capsys)
    assert code == 2 and "pip install onnxscript" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a.onnx").exists()
    code, _, err = run_cli(["-c", source, "--export", str(tmp_path / "a_small.pth")], capsys)
    assert code == 0, err  # the PyTorch export needs none of it


@needs_onnx
def test_damaged_foreign_and_unexplainable_onnx_files(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(np.random.default_rng(0).bytes(3000))
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 7])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), foreign)
    for path, words in ((damaged, "damaged or is not an ONNX model"),
                        (foreign, "not one exported by this tool")):
        code, _, err = run_cli(["-c", str(path), "--images", str(tmp_path)], capsys)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(["-c", str(foreign), "--images", str(tmp_path), "--explain"], capsys)
    assert code == 2 and "--explain needs gradients" in err
    code, _, err = run_cli(["-c", str(foreign), "--export", str(tmp_path / "again.onnx")], capsys)
    assert code == 2 and "already an ONNX file" in err


@needs_onnx
def test_benchmark_tool_runs_and_saves_json(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
    import bench_onnx
    csv = synthetic.write_synthetic_csv(tmp_path / "faces.csv", 7, 7, 8, seed=1)
    path = tmp_path / "bench.json"
    bench_onnx.main(["-d", csv, "--models", "vgg2_4_2_conv5", "--seconds", "0.01", "--rounds", "1",
                     "--json", str(path)])
    saved = json.loads(path.read_text())
    row = saved["results"][0]
    assert row["model"] == "vgg2_4_2_conv5" and row["faces_compared"] == 8
    assert set(row["img_s"]) == {"1", "64"} and row["max_abs_prob_diff"] < 1e-4
    assert "| vgg2_4_2_conv5 |" in capsys.readouterr().out and saved["machine"]["cpu"]
