"""infer.py: split reports, TTA, ensembles, own photos, and bad inputs (all on made-up data)."""
import glob
import importlib.util
import json
import os
import resource
import shutil
import struct
import sys
import threading
import zlib

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import infer
import synthetic
import checkpoint
import utils
import predict
import report
import faces
from models import FerNet

N_TEST = 30


# ----------------------------------------------------------------------------- helpers

def save_checkpoint(path, model, **extra):
    ckpt = {"format_version": checkpoint.FORMAT, "model_name": model.name,
            "model_state": model.state_dict(), "class_names": list(utils.EMOTIONS), **extra}
    torch.save(ckpt, path)
    return str(path)


def random_model(seed, name="vgg2_0_2"):
    torch.manual_seed(seed)
    return FerNet(name).eval()


def run_cli(argv, capsys, main=infer.main):
    """infer.main (or another tool's main) through utils.run_cli, in-process: (exit code, stdout,
    stderr)."""
    try:
        code = utils.run_cli(main, argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def write_huge_png(path, width, height):
    """A 1-bit black PNG of any size, written row by row: a few KB on disk, no big array."""
    def chunk(tag, data):
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
    packer = zlib.compressobj(9)
    block = b"\x00" * (1 + (width + 7) // 8) * 1000  # 1000 rows: filter byte + packed bits
    parts = [packer.compress(block) for _ in range(height // 1000)]
    parts.append(packer.compress(block[: len(block) // 1000 * (height % 1000)]))
    parts.append(packer.flush())
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n"
                + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return str(path)


def peak_rss_reset():
    """Reset the kernel's peak-RSS counter of this process when allowed (Linux): True if done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- fixtures

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def split():
    images, labels, _ = synthetic.make_synthetic(0, 0, N_TEST, seed=3)
    return images, labels


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    a = save_checkpoint(folder / "a_best.pth", random_model(0))
    b = save_checkpoint(folder / "b_best.pth", random_model(1))
    # A model that always answers Happy with known probabilities: its metrics are exact.
    const = random_model(2)
    with torch.no_grad():
        last = const.classifier[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, -1.0, 0.5, 3.0, 0.2, -0.5, 1.0]))
    happy = save_checkpoint(folder / "happy.pth", const)
    return {"a": a, "b": b, "happy": happy, "bias": last.bias.detach().clone()}


@pytest.fixture(scope="module")
def astronaut_jpg(tmp_path_factory):
    import skimage.data
    path = tmp_path_factory.mktemp("photo") / "astronaut.jpg"
    cv2.imwrite(str(path), skimage.data.astronaut()[:, :, ::-1])
    return str(path)


# ----------------------------------------------------------------------------- split reports

def test_report_writes_consistent_metrics_and_files(ckpts, split, tmp_path, capsys):
    images, labels = split
    out = tmp_path / "rep"
    m = report.report(predict.load_models([ckpts["a"]]), images, labels, str(out), num_save=5, batch_size=16)
    printed = capsys.readouterr().out
    for word in ("loss", "accuracy", "macro-F1", "precision", "recall", "Disgust", "support"):
        assert word in printed
    for key in ("loss", "accuracy", "macro_f1", "n", "per_class", "confusion_matrix", "tta"):
        assert key in m
    assert m["n"] == N_TEST and m["tta"] == "none" and "plain" not in m
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (7, 7) and cm.sum() == N_TEST
    assert (cm.sum(1) == np.bincount(labels, minlength=7)).all()

    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == N_TEST
    probs = table[[f"p_{n}" for n in utils.EMOTIONS]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    assert (table["true_label"].to_numpy() == labels).all()
    assert (table["pred_label"].to_numpy() == probs.argmax(1)).all()
    assert m["accuracy"] == pytest.approx((table["pred_label"] == table["true_label"]).mean())
    from sklearn.metrics import f1_score
    assert m["macro_f1"] == pytest.approx(f1_score(labels, table["pred_label"], average="macro", zero_division=0))

    saved = json.loads((out / "metrics.json").read_text())
    for key in ("loss", "accuracy", "macro_f1", "n", "per_class", "confusion_matrix", "checkpoints",
                "models", "class_names", "files"):
        assert key in saved
    assert saved["models"] == ["vgg2_0_2"]
    assert set(saved["per_class"]) == set(utils.EMOTIONS)
    for name in ("confusion_matrix.png", "confusion_matrix_normalized.png", "faces_grid.png"):
        assert (out / name).stat().st_size > 1000
    faces = sorted(os.listdir(out / "faces"))
    expected = sorted(f"{table['pred_emotion'][i]}_{i}.png" for i in range(5))
    assert faces == expected
    face = cv2.imread(str(out / "faces" / expected[0]), cv2.IMREAD_UNCHANGED)
    index = int(expected[0].rsplit("_", 1)[1][:-4])
    assert (face == images[index]).all()


def test_constant_model_gives_exact_metrics(ckpts, split, tmp_path):
    """A model that always says Happy: accuracy is the share of Happy, loss is -log p(label)."""
    images, labels = split
    p = torch.softmax(ckpts["bias"].double(), 0).numpy()
    models = predict.load_models([ckpts["happy"]])
    m, _ = report.compute_metrics(predict.predict(models, images, batch_size=7), labels)
    assert set(m) >= {"loss", "accuracy", "n", "macro_f1"}
    assert m["n"] == N_TEST
    assert m["accuracy"] == pytest.approx(np.mean(labels == 3))
    assert m["loss"] == pytest.approx(-np.log(p[labels]).mean(), rel=1e-5)
    share = np.mean(labels == 3)
    assert m["macro_f1"] == pytest.approx(2 * share / (1 + share) / 7)  # only Happy scores
    full = report.report(predict.load_models(ckpts["happy"]), images, labels, str(tmp_path), num_save=0)
    assert full["per_class"]["Happy"]["recall"] == 1.0
    assert full["per_class"]["Angry"]["f1"] == 0.0
    assert not (tmp_path / "faces_grid.png").exists()


def test_classes_absent_from_a_small_split(ckpts, split, tmp_path):
    images, labels = split
    keep = np.isin(labels, [3, 6])
    m = report.report(predict.load_models([ckpts["a"]]), images[keep], labels[keep], str(tmp_path), num_save=2)
    assert m["per_class"]["Disgust"]["support"] == 0
    assert np.array(m["confusion_matrix"]).sum() == keep.sum()
    # A perfect answer scores macro-F1 1: the classes neither present nor predicted are not averaged.
    perfect, _ = report.compute_metrics(np.eye(7)[labels[keep]], labels[keep])
    assert perfect["macro_f1"] == 1.0 and perfect["macro_f1_classes"] == ["Happy", "Neutral"]
    assert len(perfect["per_class"]) == 7 and perfect["per_class"]["Disgust"]["f1"] == 0.0


@pytest.mark.parametrize("tta", predict.TTA_MODES)
def test_predict_same_at_batch_size_1_and_512(ckpts, split, tta):
    models = predict.load_models([ckpts["a"], ckpts["b"]])
    images = split[0][:6]
    one = predict.predict(models, images, tta, batch_size=1)
    big = predict.predict(models, images, tta, batch_size=512)
    assert one.shape == (6, 7)
    np.testing.assert_allclose(one, big, atol=1e-5)
    np.testing.assert_allclose(big.sum(1), 1, atol=1e-6)


def test_tta_views_and_ensemble_average(ckpts, split):
    x = torch.rand(3, 1, 48, 48)
    views = predict.tta_views(x, "tencrop")
    assert len(views) == 10 and all(v.shape == x.shape for v in views.values())
    centre = torch.nn.functional.interpolate(x[..., 2:46, 2:46], size=(48, 48), mode="bilinear",
                                             align_corners=False)
    assert torch.allclose(views["crop_centre"], centre)
    assert torch.equal(views["crop_tl_mirror"], views["crop_tl"].flip(-1))
    assert set(predict.tta_views(x, "flip")) == {"plain", "mirror"}

    models = predict.load_models([ckpts["a"], ckpts["b"]])
    images = split[0][:8]
    both = predict.predict(models, images)
    single = [predict.predict([m], images) for m in models]
    np.testing.assert_allclose(both, (single[0] + single[1]) / 2, atol=1e-6)
    # Mirror-symmetric faces: flip TTA cannot change anything.
    symmetric = np.concatenate([images[:, :, :24], images[:, :, :24][:, :, ::-1]], 2)
    np.testing.assert_allclose(predict.predict(models, symmetric, "flip"),
                               predict.predict(models, symmetric), atol=1e-6)


@pytest.mark.parametrize("tta", ["flip", "tencrop"])
def test_report_with_tta_and_ensemble_keeps_both_results(ckpts, split, tmp_path, capsys, tta):
    images, labels = split
    m = report.report(predict.load_models([ckpts["a"], ckpts["b"]]), images, labels, str(tmp_path), tta=tta, num_save=3)
    printed = capsys.readouterr().out
    assert "without TTA" in printed and f"TTA {tta}" in printed
    assert m["tta"] == tta and m["models"] == ["vgg2_0_2", "vgg2_0_2"]
    for result in (m, m["plain"]):
        assert result["n"] == N_TEST and np.array(result["confusion_matrix"]).sum() == N_TEST
    main_table = pd.read_csv(tmp_path / "predictions.csv")
    plain_table = pd.read_csv(tmp_path / "predictions_plain.csv")
    assert main_table.shape == plain_table.shape == (N_TEST, 5 + 7)
    assert (tmp_path / "confusion_matrix_plain_normalized.png").exists()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["plain"]["accuracy"] == m["plain"]["accuracy"] and saved["tta"] == tta
    again = report.report(predict.load_models([ckpts["a"]]), images, labels, str(tmp_path), num_save=0)
    assert again["folder"] == f"{tmp_path}_2"  # a new folder: nothing of the first report mixes in
    assert sorted(os.listdir(again["folder"])) == ["confusion_matrix.png", "confusion_matrix_normalized.png",
                                                   "metrics.json", "predictions.csv"]


def test_cli_on_a_dataset_csv(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    csv = synthetic.write_synthetic_csv(tmp_path / "faces.csv", 14, 7, 21, seed=5)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["--checkpoint", ckpts["a"], ckpts["b"], "-d", csv, "-o", str(out),
                                 "--tta", "flip", "--num_save", "4", "--device", "cpu",
                                 "--batch_size", "8"], capsys)
    assert code == 0, err
    assert "macro-F1" in stdout and "ensemble of 2" in stdout
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n"] == 21 and saved["plain"]["n"] == 21 and saved["split"].startswith("test")
    assert len(os.listdir(out / "faces")) == 4


def test_cli_amp_computes_in_bf16_close_to_fp32(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    csv = synthetic.write_synthetic_csv(tmp_path / "faces.csv", 14, 7, 64, seed=6)
    losses = {}
    for flags in (["--no-amp"], ["--amp"]):
        out = tmp_path / flags[0][2:]
        code, stdout, err = run_cli(["-c", ckpts["a"], "-d", csv, "-o", str(out), "--num_save", "0",
                                     "--device", "cpu", *flags], capsys)
        assert code == 0, err
        losses[flags == ["--amp"]] = json.loads((out / "metrics.json").read_text())["loss"]
    if utils.amp_dtype_for(torch.device("cpu")) is None:
        assert "computing in fp32" in stdout and losses[True] == losses[False]
    else:
        assert "bfloat16 autocast" in stdout
        assert losses[True] != losses[False] and abs(losses[True] - losses[False]) < 0.02


def test_default_output_folder_is_short_and_names_the_checkpoint():
    assert infer.default_output_dir(["checkpoint/run1/vgg2_0_2_best.pth"]) == os.path.join(
        "outputs", "run1_vgg2_0_2_best_test")
    assert infer.default_output_dir(["a/x.pth", "b/y.pth"], split="val") == os.path.join("outputs", "ensemble_x+y_val")
    # each --images call gets its own folder, so no folder mixes two calls' files
    photos = infer.default_output_dir(["a/x.pth"], "photos")
    assert os.path.dirname(photos) == "outputs" and os.path.basename(photos).startswith("photos_")


def test_photo_calls_started_in_the_same_second_keep_their_own_folders(ckpts, split, tmp_path,
                                                                      monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(infer.time, "strftime", lambda pattern: pattern.replace("%Y%m%d-%H%M%S", "then"))
    cv2.imwrite("face.png", split[0][0])
    for _ in range(2):
        code, stdout, err = run_cli(["-c", ckpts["a"], "--images", "face.png", "--no-detect",
                                     "--device", "cpu"], capsys)
        assert code == 0, err
    base = tmp_path / "outputs"
    assert sorted(os.listdir(base)) == ["photos_then", "photos_then_2"]
    assert all(len(pd.read_csv(base / name / "faces.csv")) == 1 for name in os.listdir(base))


def test_fp16_checkpoint_and_run_folder(ckpts, split, tmp_path):
    model = random_model(0)
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    folder = tmp_path / "run"
    folder.mkdir()
    torch.save({"format_version": checkpoint.FORMAT, "model_name": "vgg2_0_2",
                "model_state": half}, folder / "vgg2_0_2_best.pth")
    models = predict.load_models(str(folder))  # a run folder stands for its *_best.pth
    reference = predict.load_models(ckpts["a"])
    np.testing.assert_allclose(predict.predict(models, split[0][:4]),
                               predict.predict(reference, split[0][:4]), atol=1e-2)


def test_predict_rejects_bad_arguments(ckpts, split):
    models = predict.load_models(ckpts["a"])
    with pytest.raises(ValueError, match="tta"):
        predict.predict(models, split[0][:2], "rotate")
    with pytest.raises(ValueError, match="batch_size"):
        predict.predict(models, split[0][:2], batch_size=0)
    with pytest.raises(ValueError, match="48"):
        predict.predict(models, np.zeros((2, 32, 32), np.uint8))
    assert predict.predict(models, np.zeros((0, 48, 48), np.uint8)).shape == (0, 7)


# ----------------------------------------------------------------------------- own photos

def test_shipped_model_sees_the_smiling_astronaut_as_happy(astronaut_jpg, tmp_path, capsys):
    """The trained checkpoint committed under pretrained/ works right after install."""
    shipped = glob.glob(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     "pretrained", "*.pth"))
    assert shipped, "no trained checkpoint under pretrained/"
    for path in shipped:
        out = tmp_path / os.path.basename(path)
        code, stdout, err = run_cli(["-c", path, "--images", astronaut_jpg, "-o", str(out)], capsys)
        assert code == 0, err
        table = pd.read_csv(out / "faces.csv")
        assert list(table["emotion"]) == ["Happy"] and table["confidence"][0] > 0.5


def test_the_quick_start_photo_with_the_shipped_default(tmp_path, capsys):
    """README's quick start, `infer.py --images samples/astronaut.jpg`: no --checkpoint (the best
    shipped model, <= 25 MB), no download, and a line for the face in the terminal."""
    assert os.path.getsize(predict.DEFAULT_CHECKPOINT) <= 25e6
    sample = os.path.join(os.path.dirname(predict.DEFAULT_CHECKPOINT), "..", "samples", "astronaut.jpg")
    code, stdout, err = run_cli(["--images", sample, "-o", str(tmp_path / "out")], capsys)
    assert code == 0, err
    assert "fer2013_vgg2_4_2_conv5.pth" in stdout and "vgg2_4_2_conv5" in stdout
    assert list(pd.read_csv(tmp_path / "out" / "faces.csv")["emotion"]) == ["Happy"]
    assert "astronaut.jpg face 0: Happy" in stdout


def test_astronaut_photo_gives_one_labelled_face(ckpts, astronaut_jpg, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["-c", ckpts["a"], "--images", astronaut_jpg, "-o", str(out),
                                 "--device", "cpu", "--no-amp"], capsys)
    assert code == 0, err
    table = pd.read_csv(out / "faces.csv")
    assert len(table) == 1
    row = table.iloc[0]
    assert row["emotion"] in utils.EMOTIONS and 0 < row["confidence"] <= 1
    assert 150 < row["x"] < 200 and 40 < row["y"] < 90 and 70 < row["w"] < 130  # her face
    # From Python: the same face and probabilities, from the path or from the decoded picture.
    models = predict.load_models(ckpts["a"])
    image = cv2.imread(astronaut_jpg)
    from PIL import Image
    rgb = np.ascontiguousarray(image[:, :, ::-1])
    for source, colours in ((astronaut_jpg, "bgr"), (astronaut_jpg, "rgb"), (image, "bgr"), (rgb, "rgb"),
                            (Image.fromarray(rgb), "bgr")):
        [face] = predict.detect_emotions(models, source, colours=colours)  # a path or PIL image: any colours
        assert face["box"] == tuple(int(row[k]) for k in "xywh")
        assert face["emotion"] == row["emotion"] and list(face["emotions"]) == list(utils.EMOTIONS)
        np.testing.assert_allclose(list(face["emotions"].values()),
                                   [row[f"p_{n}"] for n in utils.EMOTIONS], atol=1e-6)
    # A PIL image is read as a path is: upright by its EXIF orientation, 16-bit grey scaled to 8 bits.
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    deep = Image.fromarray((grey.astype(np.uint16) * 257)).convert("I;16")
    assert predict.detect_emotions(models, deep) == predict.detect_emotions(models, grey) != []
    turned = tmp_path / "turned.jpg"
    stored = Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_270)  # pixels on their side...
    exif = stored.getexif()
    exif[0x0112] = 8  # ...and the tag that turns them upright
    stored.save(turned, quality=100, exif=exif)
    [from_path] = predict.detect_emotions(models, str(turned))
    [from_pil] = predict.detect_emotions(models, Image.open(turned))
    assert np.abs(np.subtract(from_pil["box"], from_path["box"])).max() <= 2
    assert from_pil["emotion"] == from_path["emotion"]
    whole = predict.detect_emotions(models, cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), detect=False)
    assert [f["box"] for f in whole] == [(0, 0, image.shape[1], image.shape[0])]
    assert predict.detect_emotions(models, np.zeros((200, 200, 3), np.uint8)) == []  # no face
    with pytest.raises(ValueError, match="uint8"):
        predict.detect_emotions(models, image.astype(np.float32))
    with pytest.raises(ValueError, match="missing.jpg cannot be read"):
        predict.detect_emotions(models, str(tmp_path / "missing.jpg"))
    assert np.isclose(sum(row[f"p_{n}"] for n in utils.EMOTIONS), 1, atol=1e-4)
    listing = json.loads((out / "faces.json").read_text())
    assert listing["processed"] == 1 and listing["skipped"] == []
    assert len(listing["faces"]) == 1 and len(listing["faces"][0]["box"]) == 4
    annotated = cv2.imread(str(out / "annotated" / "astronaut.jpg"))
    assert annotated.shape == (512, 512, 3)
    assert "1 face(s)" in stdout


def test_folder_with_broken_files(ckpts, astronaut_jpg, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "deeper").mkdir(parents=True)
    good = folder / "deeper" / "Good.JPG"
    good.write_bytes(open(astronaut_jpg, "rb").read())
    (folder / "broken.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not a picture")
    cv2.imwrite(str(folder / "blank.png"), np.full((120, 160, 3), 200, np.uint8))
    missing = str(tmp_path / "nowhere.jpg")
    out = tmp_path / "out"
    code, stdout, err = run_cli(["-c", ckpts["a"], "--images", str(folder), missing, "-o", str(out),
                                 "--device", "cpu"], capsys)
    assert code == 0, err
    for name in ("broken.jpg", "empty.png", "notes.txt", "nowhere.jpg"):
        assert name in err
    assert "zero-byte" in err and "Traceback" not in err
    table = pd.read_csv(out / "faces.csv", keep_default_na=False)
    assert sorted(os.path.basename(f) for f in table["file"]) == ["Good.JPG", "blank.png"]
    blank = table[table["file"].str.endswith("blank.png")].iloc[0]
    assert blank["emotion"] == "no face" and blank["x"] == ""
    listing = json.loads((out / "faces.json").read_text())
    assert {os.path.basename(s["file"]) for s in listing["skipped"]} == {
        "broken.jpg", "empty.png", "notes.txt", "nowhere.jpg"}
    assert (out / "annotated" / "photos" / "deeper" / "Good.jpg").exists()


def crops_folder(tmp_path, faces):
    """tmp_path/crops holding each face as face<i>.png: a folder of pre-cropped faces."""
    folder = tmp_path / "crops"
    folder.mkdir()
    for i, face in enumerate(faces):
        cv2.imwrite(str(folder / f"face{i}.png"), face)
    return folder


def test_no_detect_takes_each_image_as_a_face(ckpts, split, tmp_path, capsys):
    folder = crops_folder(tmp_path, split[0][:3])
    out = tmp_path / "out"
    code, _, err = run_cli(["-c", ckpts["a"], "--images", str(folder), "--no-detect", "-o", str(out),
                            "--tta", "flip", "--device", "cpu", "--no-amp"], capsys)
    assert code == 0, err
    table = pd.read_csv(out / "faces.csv")
    assert len(table) == 3 and (table["w"] == 48).all() and (table["x"] == 0).all()
    models = predict.load_models(ckpts["a"])
    expected = predict.predict(models, split[0][:3], "flip")
    got = table[[f"p_{n}" for n in utils.EMOTIONS]].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_earlier_results_inside_a_searched_folder_are_not_taken_for_photos(ckpts, split, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    cv2.imwrite(str(folder / "face.png"), split[0][0])
    for k in (1, 2):  # the second call finds out1/annotated/face.png: not a new photo
        code, _, err = run_cli(["-c", ckpts["a"], "--images", str(folder), "--no-detect",
                                "-o", str(folder / f"out{k}"), "--device", "cpu"], capsys)
        assert code == 0, err
        assert list(pd.read_csv(folder / f"out{k}" / "faces.csv")["file"]) == [str(folder / "face.png")]
    assert f"{folder / 'out1'} holds the results of an earlier call" in err


def test_an_output_folder_used_again_keeps_the_earlier_results(ckpts, split, tmp_path, capsys):
    folder = crops_folder(tmp_path, split[0][:3])
    out = tmp_path / "out"
    out.mkdir()  # an empty folder made for the results is used as it is
    for k, images in enumerate(([folder / "face0.png", folder / "face1.png"], [folder / "face2.png"])):
        code, stdout, err = run_cli(["-c", ckpts["a"], "--images", *map(str, images), "--no-detect",
                                     "-o", str(out) + os.sep, "--device", "cpu"], capsys)
        assert code == 0, err
        assert f"annotated copies to {out}{'_2' if k else ''}\n" in stdout
    assert len(pd.read_csv(out / "faces.csv")) == 2 and len(pd.read_csv(tmp_path / "out_2" / "faces.csv")) == 1
    assert sorted(os.listdir(out / "annotated")) == ["face0.png", "face1.png"]


def test_huge_image_is_refused_from_its_header(ckpts, astronaut_jpg, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    huge = write_huge_png(folder / "huge.png", 20000, 20000)
    assert os.path.getsize(huge) < 200_000
    (folder / "ok.jpg").write_bytes(open(astronaut_jpg, "rb").read())
    out = tmp_path / "out"
    exact = peak_rss_reset()
    before = peak_rss_mb()
    code, _, err = run_cli(["-c", ckpts["a"], "--images", str(folder), "-o", str(out),
                            "--device", "cpu"], capsys)
    grown = peak_rss_mb() - before
    assert code == 0, err
    assert "huge.png" in err and "refused" in err and "20000x20000" in err
    assert grown < 300, f"peak memory grew by {grown:.0f} MB (exact measure: {exact})"
    table = pd.read_csv(out / "faces.csv")
    assert list(map(os.path.basename, table["file"])) == ["ok.jpg"]
    # Only the huge image: nothing processed, a clear error and exit code 2.
    code, _, err = run_cli(["-c", ckpts["a"], "--images", huge, "-o", str(out), "--device", "cpu"],
                           capsys)
    assert code == 2 and "nothing could be processed" in err and "Traceback" not in err


def test_large_jpeg_is_downscaled_while_decoding(ckpts, astronaut_jpg, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(faces, "MAX_PIXELS", 100_000)  # the 512x512 photo now counts as huge
    out = tmp_path / "out"
    code, _, err = run_cli(["-c", ckpts["a"], "--images", astronaut_jpg, "-o", str(out),
                            "--device", "cpu"], capsys)
    assert code == 0, err
    assert "downscaled" in err and "1/2" in err
    row = pd.read_csv(out / "faces.csv").iloc[0]
    assert 150 < row["x"] < 200 and 70 < row["w"] < 130  # the box is in the file's own pixels
    assert cv2.imread(str(out / "annotated" / "astronaut.jpg")).shape == (256, 256, 3)


def test_every_format_opencv_reads_is_taken_from_a_folder(ckpts, astronaut_jpg, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = cv2.imread(astronaut_jpg)
    for name in ("a.tif", "b.TIFF", "c.ppm", "d.pgm", "e.png"):
        assert cv2.imwrite(str(folder / name), photo if name != "d.pgm" else photo[:, :, 1])
    (folder / "notes.txt").write_text("not a picture")
    out = tmp_path / "out"
    code, _, err = run_cli(["-c", ckpts["a"], "--images", str(folder), "-o", str(out),
                            "--device", "cpu"], capsys)
    assert code == 0, err
    table = pd.read_csv(out / "faces.csv")
    assert sorted(map(os.path.basename, table["file"])) == ["a.tif", "b.TIFF", "c.ppm", "d.pgm", "e.png"]
    assert (table["x"].between(150, 200)).all()  # her face in each
    assert "notes.txt" in err
    assert sorted(os.listdir(out / "annotated" / "photos")) == ["a.png", "b.png", "c.png", "d.png", "e.png"]


@pytest.mark.parametrize("box", [(0, 50, 60, 60), (100, 60, 60, 60)])  # left edge; bottom-right corner
def test_a_face_at_the_edge_is_cropped_as_if_the_picture_went_on(box):
    """The margin past the picture's edge repeats the edge pixels, so the crop is not stretched:
    it is the crop of the same face in the picture widened by its own edge pixels."""
    grey = np.random.default_rng(0).integers(0, 256, (120, 160), dtype=np.uint8)
    pad = 20
    wider = cv2.copyMakeBorder(grey, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    x, y, w, h = box
    np.testing.assert_array_equal(faces.crop_face(grey, box), faces.crop_face(wider, (x + pad, y + pad, w, h)))


def test_stacked_faces_get_labels_that_never_overlap_or_leave_their_column():
    boxes = [(100, 0, 60, 40), (110, 42, 60, 40), (95, 84, 60, 40), (105, 126, 60, 40), (100, 168, 60, 40),
             (400, 5, 30, 30), (10, 10, 300, 300)]
    sizes = [(60, 18)] * 5 + [(30, 12), (200, 40)]
    tops = faces.place_labels(boxes, sizes, 240)
    rects = [(x, t, x + lw, t + lh) for (x, _, w, _), (lw, lh), t in zip(boxes, sizes, tops) if t is not None]
    assert len(rects) >= 6
    for (x, _, w, _), (lw, lh), t in zip(boxes, sizes, tops):
        if t is not None:
            assert lw <= w and 0 <= t <= 240 - lh  # within the box's columns and the image
    for i, a in enumerate(rects):
        for b in rects[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    # Through annotate: boxes in the emotion's colour; a small face's label keeps its percentage.
    image = np.full((240, 480, 3), 255, np.uint8)
    labelled = [(box, utils.EMOTIONS[k % 7], 0.87, k) for k, box in enumerate(boxes[:6])]
    faces.annotate(image, labelled, legend=False)
    for (x, y, w, h), emotion, _, _ in labelled:
        assert tuple(image[y + h - 1, x + w // 2]) == faces.EMOTION_COLOURS[emotion]  # bottom edge
    fit = faces.fit_label(["#12 Surprise 87%"], faces.MIN_LABEL_WIDTH, 0.4, 1)
    assert fit is not None and fit[0] == "#12 Surprise 87%"  # the longest label fits the least width
    small = np.full((120, 160, 3), 255, np.uint8)
    faces.annotate(small, [((140, 40, 20, 20), "Surprise", 0.87)], legend=False)  # at the right edge
    label_rows = np.flatnonzero((small == faces.EMOTION_COLOURS["Surprise"]).all(2).sum(1) > 60)
    assert len(label_rows) > 5  # a label wider than the 20-pixel face, moved left into the picture
    assert len(set(faces.EMOTION_COLOURS.values())) == 7
    legend = faces.draw_legend(np.zeros((480, 640, 3), np.uint8), [])
    assert legend[-10:, -10:].any() and not legend[:10, :10].any()  # bottom right by default


def test_nothing_to_process_is_an_error(ckpts, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(["-c", ckpts["a"], "--images", str(empty), "-o", str(tmp_path / "o"),
                            "--device", "cpu"], capsys)
    assert code == 2 and "no image files were found" in err


# ----------------------------------------------------------------------------- bad checkpoints

class Malicious:
    marker = None

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file when unpickled


def _bad_checkpoint(kind, folder, good):
    path = folder / f"{kind}.pth"
    if kind == "random_bytes":
        path.write_bytes(np.random.default_rng(1).bytes(5000))
    elif kind == "truncated":
        data = open(good, "rb").read()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "foreign_dict":
        torch.save({"weights": torch.zeros(3), "epoch": 4}, path)
    elif kind == "unknown_model":
        torch.save({"format_version": checkpoint.FORMAT, "model_name": "resnet50",
                    "model_state": {"w": torch.zeros(1)}}, path)
    elif kind == "wrong_weights":
        torch.save({"format_version": checkpoint.FORMAT, "model_name": "vgg2_2_2",
                    "model_state": random_model(0).state_dict()}, path)
    elif kind == "malicious":
        evil = Malicious()
        evil.marker = str(folder / "pwned")
        torch.save({"format_version": checkpoint.FORMAT, "model_name": "vgg2_0_2",
                    "model_state": {}, "extra": evil}, path)
    elif kind == "missing":
        pass
    return str(path)


@pytest.mark.parametrize("kind", ["random_bytes", "truncated", "foreign_dict", "unknown_model",
                                  "wrong_weights", "malicious", "missing"])
def test_bad_checkpoint_is_a_clear_error(kind, ckpts, astronaut_jpg, tmp_path, capsys):
    path = _bad_checkpoint(kind, tmp_path, ckpts["a"])
    code, _, err = run_cli(["-c", path, "--images", astronaut_jpg, "-o", str(tmp_path / "o"),
                            "--device", "cpu"], capsys)
    assert code == 2
    assert err.startswith("error: ") and f"{kind}.pth" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    if kind == "unknown_model":
        assert "resnet50" in err and "vgg2_4_ilrb_2" in err
    if kind == "malicious":
        assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("names", [["../../../X", *utils.EMOTIONS[1:]], [".hidden", *utils.EMOTIONS[1:]],
                                   ["Sad", *utils.EMOTIONS[1:]], ["Angry"]])
def test_a_checkpoint_with_unsafe_class_names_is_refused(ckpts, split, tmp_path, capsys, names):
    """A model's class names (FER2013's, or a folder's) end up in file names (faces/<class>_<i>.png):
    paths, hidden names, duplicates and a single class are refused."""
    renamed = save_checkpoint(tmp_path / "renamed.pth", random_model(3))
    ckpt = torch.load(renamed, weights_only=True)
    ckpt["class_names"] = names
    torch.save(ckpt, renamed)
    csv = synthetic.write_synthetic_csv(tmp_path / "faces.csv", 28, 7, 7)
    code, _, err = run_cli(["-c", renamed, "-d", csv, "-o", str(tmp_path / "o" / "deep" / "er"),
                            "--num_save", "5", "--device", "cpu"], capsys)
    assert code == 2 and "names its classes" in err and "refused" in err
    assert not list(tmp_path.rglob("X_*.png")) and not (tmp_path / "o").exists()


def test_bad_flags_exit_2(ckpts, capsys):
    code, _, err = run_cli(["-c", ckpts["a"], "--batch_size", "0"], capsys)
    assert code == 2 and "--batch_size" in err
    code, _, err = run_cli(["-c", ckpts["a"], "--tta", "rotate"], capsys)
    assert code == 2 and "--tta" in err


def test_export_writes_a_small_fp16_checkpoint_that_predicts_the_same(tmp_path):
    """--export: half the size, loads with weights_only, same predictions to fp16 precision."""
    source = tmp_path / "full.pth"
    torch.manual_seed(0)
    model = FerNet("vgg2_0_2").eval()
    torch.save({"format_version": checkpoint.FORMAT, "model_name": "vgg2_0_2",
                "model_state": model.state_dict(), "class_names": list(utils.EMOTIONS),
                "optimizer_state": {"state": {0: {"momentum_buffer": torch.zeros(2_000_000)}}}}, source)
    small = tmp_path / "small.pth"
    assert infer.main(["--checkpoint", str(source), "--export", str(small)]) == 0
    assert small.stat().st_size < source.stat().st_size / 3
    ckpt = checkpoint.load(str(small))
    assert ckpt["kind"] == "export" and "optimizer_state" not in ckpt
    crops = np.random.default_rng(0).integers(0, 256, (32, 48, 48), dtype=np.uint8)
    full = predict.predict([model], crops)
    half = predict.predict([checkpoint.build_model(ckpt)], crops)
    assert np.abs(full - half).max() < 2e-2 and (full.argmax(1) == half.argmax(1)).mean() > 0.9


def test_export_refuses_to_replace_the_checkpoint_it_reads(ckpts, tmp_path, capsys):
    source = tmp_path / "run" / "x_last.pth"
    source.parent.mkdir()
    shutil.copy(ckpts["a"], source)
    before = source.read_bytes()
    other_spelling = tmp_path / "run" / ".." / "run" / "x_last.pth"
    code, _, err = run_cli(["-c", str(other_spelling), "--export", str(source)], capsys)
    assert code == 2 and "would replace the file it reads" in err
    assert source.read_bytes() == before
    code, _, err = run_cli(["-c", str(tmp_path / "missing.pth"), "--export", str(source)], capsys)
    assert code == 2 and "no checkpoint" in err and source.read_bytes() == before


def test_exporting_an_export_keeps_weights_and_history_and_drops_paths(tmp_path):
    """Re-exporting a shipped file (to clean its metadata, or to ONNX) loses nothing."""
    source = tmp_path / "old_export.pth"
    history = [{"step": 10, "epoch": 1.0, "val_acc": 0.5, "val_loss": 1.2}]
    torch.manual_seed(0)
    weights = {k: v.half() if v.is_floating_point() else v
               for k, v in FerNet("vgg2_0_2").state_dict().items()}
    torch.save({"format_version": checkpoint.FORMAT, "kind": "export", "model_name": "vgg2_0_2", "class_names": list(utils.EMOTIONS),
                "model_state": weights, "history": history, "step": 10,
                "args": {"dataset": "/home/someone/data/fer2013.csv", "checkpoint": "/home/someone/ckpt/",
                         "lr": 0.02}}, source)
    again = tmp_path / "again.pth"
    assert infer.main(["--checkpoint", str(source), "--export", str(again)]) == 0
    ckpt = checkpoint.load(str(again))
    assert ckpt["history"] == history and ckpt["step"] == 10
    assert ckpt["args"] == {"dataset": "fer2013.csv", "checkpoint": "", "lr": 0.02}
    assert all(torch.equal(ckpt["model_state"][k], v) for k, v in weights.items())


def test_without_d_the_data_set_the_checkpoint_was_trained_on_is_used(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    csv = synthetic.write_synthetic_csv(tmp_path / "faces.csv", 14, 7, 21, seed=5)
    trained = save_checkpoint(tmp_path / "a.pth", random_model(0), dataset=str(csv))
    code, stdout, err = run_cli(["-c", trained, "-o", str(tmp_path / "out"), "--num_save", "0"], capsys)
    assert code == 0, err
    assert f"evaluating on {csv}" in stdout
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["n"] == 21
    gone = save_checkpoint(tmp_path / "b.pth", random_model(0), dataset=str(tmp_path / "moved.csv"))
    code, stdout, err = run_cli(["-c", gone, "-o", str(tmp_path / "out2")], capsys)
    assert code == 2 and "nothing to do: pass --images PHOTO" in err and "data/fer2013.csv is not there" in err
    # The bare command with the shipped model: the same advice, not a note about the file's past.
    code, stdout, err = run_cli([], capsys)
    assert code == 2 and "nothing to do: pass --images PHOTO" in err and "not there any more" not in stdout


def test_a_photo_given_to_video_is_sent_to_images(tmp_path, capsys):
    photo = tmp_path / "me.jpg"
    cv2.imwrite(str(photo), np.zeros((64, 64, 3), np.uint8))
    code, _, err = run_cli(["--video", str(photo), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "is a photo, not a video: pass photos with --images" in err


@pytest.mark.parametrize("flags, faces_found", [
    ([], 1), (["--min_face", "200"], 0), (["--strictness", "high"], 1), (["--detector", "haar_profile"], 1),
    pytest.param(["--detector", "hog"], 1, marks=pytest.mark.skipif(
        importlib.util.find_spec("dlib") is None, reason="dlib (pip install dlib-bin) is not installed"))])
def test_detector_settings_on_a_real_photo(ckpts, astronaut_jpg, tmp_path, capsys, flags, faces_found):
    out = tmp_path / "out"
    code, _, err = run_cli(["-c", ckpts["a"], "--images", astronaut_jpg, "-o", str(out), "--device", "cpu", *flags],
                           capsys)
    assert code == 0, err
    table = pd.read_csv(out / "faces.csv")
    found = table[table["emotion"] != "no face"]
    her_face = found[(found["x"].between(150, 200)) & (found["y"].between(50, 100))]
    assert len(her_face) == faces_found  # (hog also takes a patch of her suit for a face)


def test_the_hog_detector_without_dlib_is_one_clear_error(ckpts, astronaut_jpg, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib now fails
    monkeypatch.setattr(faces, "_per_thread", threading.local())
    code, _, err = run_cli(["-c", ckpts["a"], "--images", astronaut_jpg, "-o", str(tmp_path / "o"),
                            "--detector", "hog"], capsys)
    assert code == 2 and "pip install dlib-bin" in err
