"""What users and files hand infer.py (issue 30): names that are not UTF-8, export targets that
would destroy a run, weights that are not finite, read-only folders, signals and full disks in
the middle of a video, frames too small to encode. Each test reproduces what a probe found."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import checkpoint
import utils
import dataset
import photos
import synthetic
import video
from tests.test_infer import astronaut_jpg, random_model, run_cli, save_checkpoint  # noqa: F401 (fixtures)
from tests.test_video import ckpt, clip, count_frames  # noqa: F401
from tools.bench_video import make_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, FPS = (320, 240), 10.0  # as tests/test_video.py's clip

pytestmark = pytest.mark.usefixtures("one_thread")


def infer_process(*argv):
    """infer.py in its own process (a crash there must not take pytest down)."""
    return subprocess.Popen([sys.executable, "infer.py", *argv, "--device", "cpu"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1"))


# ----------------------------------------------------------------------------- 1: names

def test_names_that_are_not_utf8_neither_crash_nor_lose_the_results(ckpt, astronaut_jpg, clip, tmp_path):
    photos, videos = tmp_path / "photos", tmp_path / "videos"
    photos.mkdir(), videos.mkdir()
    good, junk = os.fsdecode(b"good\xff.jpg"), os.fsdecode(b"junk\xff.jpg")
    with open(photos / good, "wb") as f:
        f.write(open(astronaut_jpg, "rb").read())
    with open(photos / junk, "wb") as f:
        f.write(b"not an image at all")
    with open(videos / os.fsdecode(b"clip\xff.mp4"), "wb") as f:
        f.write(open(clip[0], "rb").read())
    with open(videos / "plain.mp4", "wb") as f:
        f.write(open(clip[0], "rb").read())
    out = tmp_path / "out"
    process = infer_process("-c", ckpt, "--images", str(photos), "--video", str(videos), "-o", str(out))
    stdout, stderr = process.communicate(timeout=300)
    err = stderr.decode("utf-8", "replace")
    assert process.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    table = pd.read_csv(out / "faces.csv")
    assert list(table["file"].map(os.path.basename)) == ["good\\xff.jpg"]  # printable, not lost
    assert os.path.exists(table["annotated"][0])  # the row names the copy as it is on disk
    listed = json.loads((out / "faces.json").read_text())
    assert [os.path.basename(f["file"]) for f in listed["faces"]] == ["good\\xff.jpg"]
    assert [os.path.basename(s["file"]) for s in listed["skipped"]] == ["junk\\xff.jpg"]
    lines = [line for line in err.splitlines() if "clip\\xff.mp4" in line]
    assert len(lines) == 1 and "not valid UTF-8" in lines[0] and "rename" in lines[0]
    assert (out / "plain" / "summary.json").exists()


def test_output_folders_named_after_a_non_utf8_checkpoint_folder_are_printable(tmp_path):
    import infer
    folder = os.fsdecode(b"run\xff")
    made = infer.default_output_dir([os.path.join(str(tmp_path), folder, "a_best.pth")])
    assert made == os.path.join("outputs", "run\\xff_a_best_test")


# ----------------------------------------------------------------------------- 3: exports

def training_file(path):
    """A file as run.py saves it: weights plus what resuming needs."""
    return save_checkpoint(path, random_model(1), kind="last", train_state={"step": 8},
                           optimizer_state={"state": {}, "param_groups": []})


def test_an_export_never_replaces_a_training_checkpoint_or_a_foreign_file(ckpt, tmp_path, capsys):
    last = training_file(tmp_path / "x_last.pth")
    notes = tmp_path / "notes.pth"
    notes.write_text("my notes")
    for target in (last, notes):
        before = open(target, "rb").read()
        code, _, err = run_cli(["-c", ckpt, "--export", str(target)], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "only replaces an earlier export" in err and str(target) in err
        assert open(target, "rb").read() == before
    # An earlier export is replaced.
    small = tmp_path / "small.pth"
    for _ in range(2):
        code, _, err = run_cli(["-c", ckpt, "--export", str(small)], capsys)
        assert code == 0, err
    assert checkpoint.load(str(small))["kind"] == checkpoint.EXPORT


@pytest.mark.parametrize("target", ["", "folder", "folder/"])
def test_an_export_to_a_folder_or_an_empty_name_is_refused(ckpt, tmp_path, capsys, target):
    (tmp_path / "folder").mkdir()
    code, _, err = run_cli(["-c", ckpt, "--export", str(tmp_path / target) if target else ""], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "--export" in err and os.listdir(tmp_path / "folder") == []


def test_an_export_into_a_read_only_folder_is_one_error_line(ckpt, tmp_path, read_only, capsys):
    folder = tmp_path / "locked"
    folder.mkdir()
    read_only(folder)
    code, _, err = run_cli(["-c", ckpt, "--export", str(folder / "small.pth")], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Read-only file system" in err and str(folder) in err


# ----------------------------------------------------------------------------- 5: weights

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_weights_that_are_not_finite_is_refused(ckpt, tmp_path, capsys, value):
    model = random_model(0)
    with torch.no_grad():
        model.classifier[-1].weight[0, 0] = value
    broken = save_checkpoint(tmp_path / "broken.pth", model)
    csv = synthetic.write_synthetic_csv(tmp_path / "faces.csv", 7, 7, 7)
    code, _, err = run_cli(["-c", broken, "-d", csv, "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "broken.pth" in err and "not finite" in err, err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- 7: video

def test_sigterm_mid_video_finishes_the_files_as_ctrl_c_does(ckpt, tmp_path):
    long_clip = tmp_path / "long.mp4"
    make_clip(long_clip, 400, 1, SIZE, FPS, (0, 0))
    out = tmp_path / "out"
    process = infer_process("-c", ckpt, "--video", str(long_clip), "-o", str(out))
    frames = out / "long" / "frames.csv"
    end = time.time() + 120
    while not (frames.exists() and len(frames.read_text().splitlines()) > 4):
        assert process.poll() is None, process.communicate()
        assert time.time() < end
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    err = stderr.decode()
    assert process.returncode in (130, 143) and "Traceback" not in err, err[-3000:]
    summary = json.loads((out / "long" / "summary.json").read_text())
    assert summary["interrupted"] and 0 < summary["frames_analysed"] < 400
    assert count_frames(out / "long" / "annotated.mp4") == summary["frames_analysed"]


def test_a_full_disk_mid_video_never_claims_an_unreadable_video_is_intact(ckpt, clip, tmp_path,
                                                                             monkeypatch, capsys):
    """As on a full disk: the video writer's output is cut short (OpenCV does not say so) and the
    timeline cannot be written."""
    class CutShortWriter:
        def __init__(self, path, *args):
            self.path = path
            open(path, "wb").close()

        def isOpened(self):
            return True

        def write(self, frame):
            with open(self.path, "ab") as f:
                f.write(b"\0" * 64)

        def release(self):
            pass

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(cv2, "VideoWriter", CutShortWriter)
    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "out"
    code, _, err = run_cli(["-c", ckpt, "--video", clip[0], "-o", str(out), "--device", "cpu"], capsys)
    assert code == 2 and "Traceback" not in err, err
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: ") and "full" in message and "frames.csv" in message
    assert "annotated.mp4" in message and "could not be finished" in message
    assert not (out / "interview" / "annotated.mp4").exists()  # no unreadable video left to trust
    assert len(pd.read_csv(out / "interview" / "frames.csv")) > 0


def test_one_pixel_frames_name_the_cause_and_the_summary_lists_only_real_files(ckpt, tmp_path, capsys):
    tiny = tmp_path / "tiny.avi"
    writer = cv2.VideoWriter(str(tiny), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (1, 1))
    for k in range(5):
        writer.write(np.full((1, 1, 3), 40 * k, np.uint8))
    writer.release()
    out = tmp_path / "out"
    code, _, err = run_cli(["-c", ckpt, "--video", str(tiny), "-o", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    assert "too small" in err and "1x1" in err and "no MP4 encoder" not in err
    summary = json.loads((out / "tiny" / "summary.json").read_text())
    assert summary["frames_analysed"] == 5
    assert "annotated.mp4" not in summary["files"]
    assert all(os.path.exists(path) for path in summary["files"].values())


# ----------------------------------------------------------------------------- beyond the list

def test_a_video_folder_whose_name_is_not_utf8_gets_no_annotated_video_and_no_crash(tmp_path, capsys):
    folder = tmp_path / os.fsdecode(b"out\xff")
    folder.mkdir()
    assert video.open_writer(str(folder / "annotated.mp4"), FPS, SIZE) is None
    assert "out\\xff" in capsys.readouterr().err and not os.listdir(folder)


def test_a_data_set_whose_name_is_not_utf8_is_read_and_cached(tmp_path):
    csv = synthetic.write_synthetic_csv(tmp_path / "faces.csv", 14, 7, 7, seed=2)
    odd = str(tmp_path / os.fsdecode(b"faces\xff.csv"))
    os.rename(csv, odd)
    for _ in range(2):  # decoded, then from the cache
        data = dataset.load_fer2013(odd, cache_dir=str(tmp_path / "cache"))
        assert len(data.labels) == 28
    assert len(os.listdir(tmp_path / "cache")) == 1


def test_a_full_cache_folder_only_costs_speed(tmp_path, monkeypatch):
    csv = synthetic.write_synthetic_csv(tmp_path / "faces.csv", 14, 7, 7, seed=2)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    said = []
    data = dataset.load_fer2013(csv, cache_dir=str(tmp_path / "cache"), log=said.append)
    assert len(data.labels) == 28 and "could not cache" in said[0]


def test_ctrl_c_mid_photos_keeps_the_tables_of_the_photos_done(ckpt, astronaut_jpg, tmp_path,
                                                               interrupt_annotate, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for k in range(3):
        (folder / f"p{k}.jpg").write_bytes(open(astronaut_jpg, "rb").read())
    interrupt_annotate(photos, 2)
    out = tmp_path / "out"
    code, _, err = run_cli(["-c", ckpt, "--images", str(folder), "-o", str(out), "--device", "cpu"], capsys)
    assert code == 130 and "interrupted after 1 of 3 photo(s)" in err and "Traceback" not in err
    table = pd.read_csv(out / "faces.csv")
    assert list(table["file"].map(os.path.basename).unique()) == ["p0.jpg"]
    assert json.loads((out / "faces.json").read_text())["interrupted"]


@pytest.mark.parametrize("argv", [["--images", ""], ["-c", "", "--images", "x"], ["--images", "x", "-o", ""],
                                  ["--video", ""], ["-d", ""]])
def test_empty_paths_are_refused_by_infer(argv, capsys):
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "an empty path" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("argv", [["-d", ""], ["--chart", ""]])
def test_empty_paths_are_refused_by_the_data_checker(argv, capsys):
    code, _, err = run_cli(argv, capsys, dataset.main)
    assert code == 2 and "an empty path" in err and len(err.strip().splitlines()) == 1, err


SIGTERM_AND_ODD_NAMES = """
import os, signal, sys, utils
def main(argv):
    print("a name that is not UTF-8:", os.fsdecode(b"x\\xff.jpg"))
    if argv:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause()
        finally:
            print("cleaned up")
    return 0
sys.exit(utils.run_cli(main))
"""


@pytest.mark.parametrize("terminate", [False, True])
def test_run_cli_survives_odd_names_on_a_strict_terminal_and_ends_cleanly_on_sigterm(terminate):
    done = subprocess.run([sys.executable, "-c", SIGTERM_AND_ODD_NAMES, *(["term"] if terminate else [])],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=ROOT, PYTHONIOENCODING="utf-8:strict"))
    assert "not UTF-8: x\\udcff.jpg" in done.stdout and "Traceback" not in done.stderr, done.stderr
    if terminate:
        assert done.returncode == 143 and "cleaned up" in done.stdout
        assert "interrupted (SIGTERM)" in done.stderr
    else:
        assert done.returncode == 0


def onnx_of_ours(path, weight, input_side=48):
    """A small ONNX graph with this tool's metadata: faces (N, 1, side, side) -> Flatten -> MatMul."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    import onnx_model
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["faces"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "made-up", [helper.make_tensor_value_info("faces", TensorProto.FLOAT, ["N", 1, input_side, input_side])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", weight.shape[1]])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    for key, value in {"format": onnx_model.FORMAT, "model_name": "vgg2_0_2",
                       "class_names": json.dumps(list(utils.EMOTIONS))}.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(model, path)
    return str(path)


@pytest.mark.skipif(not all(__import__("importlib").util.find_spec(m) for m in ("onnx", "onnxruntime")),
                    reason="needs the optional onnx and onnxruntime packages")
def test_onnx_files_of_the_right_format_but_the_wrong_shape_or_weights_are_refused(astronaut_jpg, tmp_path, capsys):
    nan = np.full((48 * 48, 7), np.nan)
    cases = {os.fsdecode(b"fine\xff.onnx"): (np.zeros((48 * 48, 7)), 48, None),
             "nan.onnx": (nan, 48, "not finite"), "three.onnx": (np.zeros((48 * 48, 3)), 48, "not 7 class scores"),
             "small.onnx": (np.zeros((32 * 32, 7)), 32, "does not take faces (N, 1, 48, 48)")}
    for name, (weight, side, words) in cases.items():
        path = onnx_of_ours(tmp_path / name, weight, side)
        code, _, err = run_cli(["-c", path, "--images", astronaut_jpg, "-o", str(tmp_path / "o" / name)], capsys)
        if words is None:
            assert code == 0, err  # a name that is not UTF-8 is read too
        else:
            assert code == 2 and words in err and name in err and len(err.strip().splitlines()) == 1, err
