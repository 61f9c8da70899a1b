"""Folders of face images (folders.py): layouts, class names, splits, junk, faces in photos, the
cache, and training, fine-tuning and evaluating on them. Every folder is written here, in tmp."""
import json
import os
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import checkpoint
import dataset
import faces
import folders
import infer
import run
import synthetic
import utils
from models import FerNet
from test_infer import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "pretrained", "fer2013_vgg2_0_2.pth")
# Our seven classes in other spellings (folder name -> label of the synthetic face drawn for it).
SPELLINGS = {"anger": 0, "Disgusted": 1, "FEARFUL": 2, "happiness": 3, "Sadness": 4, "surprised": 5,
             "3_neutral": 6}
JPEG_ROUNDING = 16  # grey levels a 48x48 JPEG (quality 95) may differ from its pixels


def write_folder(root, classes, n, seed=0, split=None, exts=(".png", ".jpg")):
    """n synthetic faces per class as root/[split/]<folder>/<i><ext>; {relative path: face}."""
    rng = np.random.default_rng(seed)
    written = {}
    for folder, label in classes.items():
        where = os.path.join(root, split or "", folder)
        os.makedirs(where, exist_ok=True)
        for i, face in enumerate(synthetic.make_faces(np.full(n, label), rng)):
            path = os.path.join(where, f"{i:03d}{exts[i % len(exts)]}")
            assert cv2.imwrite(path, face)
            written[os.path.relpath(path, root)] = face
    return written


def cli(main, argv, capsys):
    """(exit code, stdout, stderr) of a tool's main, in-process."""
    return run_cli(argv, capsys, main)


def run_args(folder, tmp_path, *extra):
    return ["-d", str(folder), "--checkpoint_dir", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"),
            "--pretrained", "no", "--num_save", "0", "--run_name", "r", "--threads", "1", *extra]


# ----------------------------------------------------------------------------- layouts and names

def test_split_folders_in_other_spellings_become_our_seven_classes(tmp_path, capsys):
    root = tmp_path / "d"
    written = {**write_folder(root, SPELLINGS, 20, split="Training"),
               **write_folder(root, SPELLINGS, 5, seed=1, split="test")}
    data = folders.load_folder(str(root))
    assert data.class_names == utils.EMOTIONS and data.faces == "whole"
    counts = {k: v.tolist() for k, v in dataset.class_counts(data).items()}
    # No validation folder: a stratified tenth of each training class is held out for it.
    assert counts == {"train": [18] * 7, "val": [2] * 7, "test": [5] * 7}
    for face, path, label, usage in zip(data.images, data.files, data.labels, data.usage):
        split, folder = path.split(os.sep)[:2]
        assert label == SPELLINGS[folder]
        assert (split == "test") == (usage == folders.SPLIT_CODES["test"])
        diff = np.abs(face.astype(int) - written[path]).max()
        assert diff == 0 if path.endswith(".png") else diff <= JPEG_ROUNDING, path
    out = capsys.readouterr().out
    assert "no val folder: a stratified tenth of train is held out" in out
    assert "faces: whole images" in out and "Happy (from happiness)" in out


def test_class_folders_split_80_10_10_per_class_the_same_way_wherever_the_folder_is(tmp_path, capsys):
    root = tmp_path / "d"
    write_folder(root, {"happy": 3, "sad": 4, "contempt": 1}, 30)
    data = folders.load_folder(str(root))
    # Ours first in our order, then the others; the head is sized to the classes found.
    assert data.class_names == ("Happy", "Sad", "contempt")
    counts = {k: v.tolist() for k, v in dataset.class_counts(data).items()}
    assert counts == {"train": [24] * 3, "val": [3] * 3, "test": [3] * 3}
    assert "split 80/10/10 per class" in capsys.readouterr().out
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "d")
    again = folders.load_folder(str(moved))
    assert again.files == data.files and np.array_equal(again.usage, data.usage)
    assert again.fingerprint == data.fingerprint
    assert "decoding" not in capsys.readouterr().out  # the moved folder's faces come from the cache


def test_junk_empty_classes_loops_and_names_in_any_encoding_are_listed_not_fatal(tmp_path, capsys):
    root = tmp_path / "d"
    write_folder(root, {"happy": 3, "sad": 4}, 10)
    (root / "README.txt").write_text("about")
    (root / "happy" / "notes.txt").write_text("not a face")
    (root / "happy" / "damaged.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (root / "happy" / "empty.png").write_bytes(b"")
    (root / "happy" / ".DS_Store").write_bytes(b"\0\0")
    (root / "contempt").mkdir()  # a class folder with no images
    os.symlink("..", root / "sad" / "loop")  # a loop of symbolic links
    face = cv2.imencode(".png", synthetic.make_faces(np.array([4]), np.random.default_rng(5))[0])[1]
    odd = [b"sad/caf\xe9.png", "sad/日本 語,x.png".encode(), b"sad/new\nline.png", b"gl\xfcck/1.png"]
    os.makedirs(os.path.join(os.fsencode(root), b"gl\xfcck"))
    for name in odd:
        with open(os.path.join(os.fsencode(root), name), "wb") as f:
            f.write(face.tobytes())
    code, out, err = cli(dataset.main, ["-d", str(root)], capsys)  # prints without a UnicodeError
    assert code == 0, err
    assert "gl\ufffdck (from gl\\xfcck" in out and "left out 6 of" in out
    data = folders.load_folder(str(root))
    assert data.class_names == ("Happy", "Sad", "gl\ufffdck")
    assert {os.fsdecode(name) for name in odd} <= set(data.files)
    left = {path: why for path, why in data.skipped}
    assert set(left) == {"README.txt", "happy/notes.txt", "happy/damaged.jpg", "happy/empty.png",
                         "contempt", "sad/loop"}
    assert "loop" in left["sad/loop"] and "zero-byte" in left["happy/empty.png"]
    folders.write_split(data, str(tmp_path / "out"))
    assert folders.read_split(str(tmp_path / "out" / folders.SPLIT_FILE)).keys() == set(data.files)
    listed = pd.read_csv(tmp_path / "out" / folders.LEFT_OUT_FILE)
    assert sorted(listed["file"]) == sorted(left)


@pytest.mark.parametrize("build, message", [
    ("empty", "holds no images in class folders"),
    ("junk", "holds no images in class folders"),
    ("loose", "holds no images in class folders"),
    ("one_class", "training faces of one class only (Happy)"),
    ("no_train", "no faces to train on"),
    ("unseen_class", "faces of contempt, which the train split lacks"),
    ("two_train", "two folders for the train split"),
    ("all_damaged", "none of the 2 images"),
])
def test_a_folder_that_cannot_be_trained_on_is_a_one_line_error(tmp_path, capsys, build, message):
    root = tmp_path / "d"
    root.mkdir()
    if build == "junk":
        (root / "notes.txt").write_text("x")
        (root / "happy").mkdir()
        (root / "happy" / "a.txt").write_text("x")
    elif build == "loose":  # images, but not in class folders
        cv2.imwrite(str(root / "a.png"), np.zeros((48, 48), np.uint8))
    elif build == "one_class":
        write_folder(root, {"happy": 3}, 6)
    elif build == "no_train":
        write_folder(root, {"happy": 3, "sad": 4}, 3, split="test")
    elif build == "unseen_class":
        write_folder(root, {"happy": 3, "sad": 4}, 6, split="train")
        write_folder(root, {"happy": 3, "contempt": 4}, 3, split="test")
    elif build == "two_train":
        write_folder(root, {"happy": 3, "sad": 4}, 3, split="train")
        write_folder(root, {"happy": 3, "sad": 4}, 3, split="Training")
    elif build == "all_damaged":
        for name in ("happy", "sad"):
            (root / name).mkdir()
            (root / name / "x.jpg").write_bytes(b"\xff\xd8 broken")
    code, out, err = cli(run.main, run_args(root, tmp_path, "--epoch_num", "1"), capsys)
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- faces in photos

@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Two large photos: the astronaut on a bigger canvas (a real face), and one with no face."""
    import skimage.data
    root = tmp_path_factory.mktemp("photos") / "d"
    for name in ("happy", "neutral"):
        (root / name).mkdir(parents=True)
    canvas = np.full((1200, 1600, 3), 128, np.uint8)
    canvas[300:812, 700:1212] = skimage.data.astronaut()[:, :, ::-1]
    cv2.imwrite(str(root / "happy" / "astronaut.jpg"), canvas)
    cv2.imwrite(str(root / "neutral" / "wall.png"), np.full((900, 1200, 3), 90, np.uint8))
    return root


def test_faces_are_found_in_large_photos_and_photos_without_one_are_left_out(photo_folder, capsys):
    data = folders.load_folder(str(photo_folder))
    assert data.faces == "detect" and "faces: detect" in capsys.readouterr().out
    assert data.files == ["happy/astronaut.jpg"] and data.class_names == ("Happy",)
    assert data.skipped == [("neutral/wall.png", folders.NO_FACE)]
    # The same face as --images crops: the same detector, the largest face, the same margin.
    image, _, _ = faces.read_image(str(photo_folder / "happy" / "astronaut.jpg"))
    grey = faces.grey_of(image)
    detector = faces.face_detector("haar")
    box = max(detector.detect(image), key=lambda b: b[2] * b[3])
    assert 700 < box[0] < 1212 and 300 < box[1] < 812  # on the astronaut
    assert np.array_equal(data.images[0], faces.crop_face(grey, box, faces.FACE_MARGIN))
    whole = folders.load_folder(str(photo_folder), faces="whole")
    assert len(whole.files) == 2 and np.array_equal(
        whole.images[0], cv2.resize(grey, (48, 48), interpolation=cv2.INTER_AREA))


def test_faces_are_decoded_once_and_again_when_a_file_changes(tmp_path, monkeypatch):
    root = tmp_path / "d"
    write_folder(root, {"happy": 3, "sad": 4}, 5)
    calls = []
    real = folders.decode
    monkeypatch.setattr(folders, "decode", lambda *a: calls.append(1) or real(*a))
    first = folders.load_folder(str(root), log=lambda *a: None)
    second = folders.load_folder(str(root), log=lambda *a: None)
    assert len(calls) == 1 and np.array_equal(first.images, second.images)
    cv2.imwrite(str(root / "happy" / "000.png"), np.zeros((48, 48), np.uint8))
    os.utime(root / "happy" / "000.png", ns=(1, 1))  # even with an old time: the size changed
    third = folders.load_folder(str(root), log=lambda *a: None)
    assert len(calls) == 2 and not third.images[third.files.index("happy/000.png")].any()
    assert third.fingerprint != first.fingerprint


# ----------------------------------------------------------------------------- training and evaluation

def test_a_run_on_a_folder_learns_and_infer_judges_the_same_test_faces(tmp_path, capsys):
    root = tmp_path / "faces"
    write_folder(root, {"happy": 3, "surprise": 5, "angry": 0}, 120, seed=2)
    assert run.main(run_args(root, tmp_path, "-m", "vgg2_0_2", "--epoch_num", "6", "--batch_size", "32",
                             "--optimizer", "adamw", "--erase_p", "0", "--ema_decay", "0")) == 0
    test = json.loads((tmp_path / "out" / "r" / "test" / "metrics.json").read_text())
    assert test["n"] == 36 and test["class_names"] == ["Angry", "Happy", "Surprise"]
    assert test["accuracy"] > 0.6, test  # chance is 1/3
    best = tmp_path / "ckpt" / "r" / "vgg2_0_2_best.pth"
    ckpt = torch.load(best, weights_only=True)
    assert ckpt["class_names"] == ["Angry", "Happy", "Surprise"]
    assert ckpt["args"]["faces"] == "whole" and len(ckpt["args"]["data_sha256"]) == 64
    for folder in (tmp_path / "out" / "r", tmp_path / "ckpt" / "r"):
        split = pd.read_csv(folder / folders.SPLIT_FILE)
        assert split["split"].value_counts().to_dict() == {"train": 288, "val": 36, "test": 36}
    capsys.readouterr()
    code, out, err = cli(infer.main, ["-c", str(best), "-d", str(root), "-o", str(tmp_path / "again"),
                                      "--num_save", "0"], capsys)
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["accuracy"] == test["accuracy"] and "note:" not in out  # the same faces
    predictions = pd.read_csv(tmp_path / "again" / "predictions.csv")
    tested = split[split["split"] == "test"]
    assert predictions["file"].tolist() == tested["file"].tolist()
    assert (predictions["true_emotion"] == tested["class"].to_numpy()).all()
    last = str(tmp_path / "ckpt" / "r" / "vgg2_0_2_last.pth")  # a folder's run knows when it is done
    code, out, err = cli(run.main, ["--checkpoint", last, "-o", str(tmp_path / "out")], capsys)
    assert code == 0 and "already finished all its 6 epochs" in out, out + err


def test_resuming_on_a_changed_folder_names_what_changed(tmp_path, capsys):
    root = tmp_path / "faces"
    write_folder(root, {"happy": 3, "sad": 4}, 12)
    assert run.main(run_args(root, tmp_path, "-m", "vgg2_0_2", "--epoch_num", "1", "--batch_size", "32")) == 0
    last = str(tmp_path / "ckpt" / "r" / "vgg2_0_2_last.pth")
    os.remove(root / "sad" / "004.png")
    shutil.copy(root / "happy" / "001.jpg", root / "happy" / "new.jpg")
    capsys.readouterr()
    code, out, err = cli(run.main, ["--checkpoint", last, "-o", str(tmp_path / "out"), "--epoch_num", "2"],
                         capsys)
    assert code == 2 and "1 gone (sad/004.png)" in err and "1 new (happy/new.jpg)" in err, err
    code, out, err = cli(infer.main, ["-c", last, "-d", str(root), "-o", str(tmp_path / "i"),
                                      "--num_save", "0"], capsys)
    assert code == 0 and "note: " in out and "sad/004.png" in out


@pytest.mark.parametrize("extra, replaced", [({}, False), ({"contempt": 1}, True)])
def test_fine_tuning_a_shipped_model_keeps_its_head_or_replaces_it(tmp_path, capsys, extra, replaced):
    root = tmp_path / "faces"
    write_folder(root, {**SPELLINGS, **extra}, 6)
    assert run.main(run_args(root, tmp_path, "--init_from", SHIPPED, "--epoch_num", "1",
                             "--lr", "1e-9", "--erase_p", "0")) == 0
    out = capsys.readouterr().out
    assert ("last layer was replaced by a new one for 8 classes" in out) == replaced
    tuned = torch.load(tmp_path / "ckpt" / "r" / "vgg2_0_2_last.pth", weights_only=True)
    head = tuned["model_state"]["classifier.4.weight"]
    shipped = checkpoint.model_weights(checkpoint.load(SHIPPED))["classifier.4.weight"].float()
    assert tuned["class_names"] == list(utils.EMOTIONS) + (["contempt"] if replaced else [])
    assert torch.allclose(head[:7], shipped, atol=1e-4)  # our seven rows: kept, or copied
    assert head.shape[0] == len(tuned["class_names"])


def test_a_model_is_judged_on_a_folder_with_a_class_it_does_not_have(tmp_path, capsys):
    root = tmp_path / "ck+"
    write_folder(root, {"anger": 0, "happy": 3, "contempt": 1}, 4)
    out_dir = tmp_path / "report"
    code, out, err = cli(infer.main, ["-c", SHIPPED, "-d", str(root), "--split", "all", "-o", str(out_dir),
                                      "--num_save", "2", "--device", "cpu"], capsys)
    assert code == 0, err
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["n"] == 8 and metrics["class_names"] == list(utils.EMOTIONS)
    apart = metrics["classes_not_in_model"]["contempt"]
    assert apart["faces"] == 4 and sum(apart["taken_for"].values()) == 4
    assert "contempt: 4 faces of a class the model does not have" in out
    predictions = pd.read_csv(out_dir / "predictions.csv")
    assert len(predictions) == 8 and predictions["file"].str.startswith(("anger/", "happy/")).all()


@pytest.mark.parametrize("kind", [".pth", ".onnx"])
def test_a_model_of_other_classes_is_evaluated_in_its_classes_and_refused_for_photos(tmp_path, capsys, kind):
    names = ["Happy", "Sad", "contempt"]
    path = tmp_path / "three.pth"
    torch.save({"format_version": checkpoint.FORMAT, "model_name": "vgg2_0_2", "class_names": names,
                "model_state": FerNet("vgg2_0_2", class_names=names).state_dict()}, path)
    if kind == ".onnx":  # the class names travel in the ONNX file too
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
        path = checkpoint.export(path, tmp_path / "three.onnx")
    root = tmp_path / "d"
    write_folder(root, {"contempt": 1, "sad": 4}, 10)
    code, out, err = cli(infer.main, ["-c", str(path), "-d", str(root), "--split", "all",
                                      "-o", str(tmp_path / "r"), "--num_save", "3"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["class_names"] == names and metrics["n"] == 20
    assert metrics["per_class"]["Happy"]["support"] == 0 and metrics["per_class"]["contempt"]["support"] == 10
    if kind == ".pth":  # Grad-CAM of a class by FER2013's name, at its place among the model's classes
        code, out, err = cli(infer.main, ["-c", str(path), "-d", str(root), "--split", "all", "-o",
                                          str(tmp_path / "x"), "--num_save", "2", "--explain_class", "sad"], capsys)
        assert code == 0 and (tmp_path / "x" / "explain_grid.png").exists(), err
        code, out, err = cli(infer.main, ["-c", str(path), "-d", str(root), "--split", "all", "-o",
                                          str(tmp_path / "y"), "--num_save", "2", "--explain_class", "angry"], capsys)
        assert code == 2 and "--explain_class Angry: the model has no such class" in err, err
    code, out, err = cli(infer.main, ["-c", str(path), "--images", str(root / "sad" / "000.png"),
                                      "-o", str(tmp_path / "p")], capsys)
    assert code == 2 and "--images and --video need a model of FER2013's seven classes" in err


def test_a_folder_report_lists_its_faces_and_the_files_left_out(tmp_path, capsys):
    root = tmp_path / "faces"
    write_folder(root, {"happy": 3, "sad": 4}, 3)
    (root / "sad" / "notes.txt").write_text("not an image")
    code, out, err = cli(infer.main, ["-c", SHIPPED, "-d", str(root), "--split", "all", "-o", str(tmp_path / "r"),
                                      "--num_save", "0"], capsys)
    assert code == 0, err
    assert "left out 1 of 7 files" in out and "list them all in left_out.csv" in out
    left_out = pd.read_csv(tmp_path / "r" / "left_out.csv")
    assert list(left_out["file"]) == [os.path.join("sad", "notes.txt")]
    split = pd.read_csv(tmp_path / "r" / "split.csv")
    assert len(split) == 6 and set(split["class"]) == {"Happy", "Sad"}


def test_a_run_that_diverges_before_its_first_save_leaves_no_folders(tmp_path, capsys):
    root = tmp_path / "faces"
    write_folder(root, {"happy": 3, "sad": 4}, 12)
    (root / "happy" / "notes.txt").write_text("not an image")  # a file left out: left_out.csv has a row
    argv = run_args(root, tmp_path, "-m", "vgg2_0_2", "--epoch_num", "2", "--lr", "1e8", "--scheduler", "none",
                    "--num_iter_to_validate", "4")
    for _ in range(2):  # the same command again is not refused for the first one's files
        code, _, err = cli(run.main, argv, capsys)
        assert code == 2 and "no checkpoint was saved" in err, err
        assert not (tmp_path / "ckpt" / "r").exists() and not (tmp_path / "out" / "r").exists()


def test_detector_flags_on_a_folder_report_are_refused_not_ignored(tmp_path, capsys):
    root = tmp_path / "faces"
    write_folder(root, {"happy": 3}, 2)
    code, _, err = cli(infer.main, ["-c", SHIPPED, "-d", str(root), "--faces", "whole", "--detector", "haar_profile",
                                    "--min_face", "30", "-o", str(tmp_path / "r")], capsys)
    assert code == 2 and "--detector, --min_face apply to --images and --video" in err, err
    assert not (tmp_path / "r").exists()


def test_a_teacher_must_have_the_classes_of_the_data(tmp_path, capsys):
    root = tmp_path / "faces"
    write_folder(root, {"happy": 3, "sad": 4}, 6)
    teacher = tmp_path / "seven.pth"  # FER2013's seven classes, the folder has two
    torch.save({"format_version": checkpoint.FORMAT, "model_name": "vgg2_0_2", "class_names": list(utils.EMOTIONS),
                "model_state": FerNet("vgg2_0_2").state_dict()}, teacher)
    code, out, err = cli(run.main, run_args(root, tmp_path, "-m", "vgg2_0_2", "--epoch_num", "1",
                                            "--teacher", str(teacher)), capsys)
    assert code == 2 and "a teacher must have the student's classes" in err, err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "out").exists()


def test_a_folder_export_of_a_csv_loads_to_the_same_faces(tmp_path):
    from tools import bench_folders
    csv = synthetic.write_synthetic_csv(str(tmp_path / "faces.csv"), 70, 14, 14, seed=4)
    for ext, rounding in ((".png", 0), (".jpg", JPEG_ROUNDING)):
        root = str(tmp_path / ext[1:])
        assert bench_folders.export_csv(csv, root, ext) == 98
        same = bench_folders.compare(dataset.load_fer2013(csv), folders.load_folder(root, log=lambda *a: None))
        assert same["labels_equal"] and same["splits_equal"] and same["max_abs_diff"] <= rounding, same
