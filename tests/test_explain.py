"""Grad-CAM (explain.py, infer.py --explain): the layer table, the maps' shape, that they point at
the evidence, and the files the command line writes (all on made-up faces)."""
import os

import cv2
import numpy as np
import pytest
import torch
from torch import nn

import explain
import models
import synthetic
import utils
import predict
from test_infer import random_model, run_cli, save_checkpoint

HAPPY, SAD, NEUTRAL = (utils.EMOTIONS.index(e) for e in ("Happy", "Sad", "Neutral"))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def faces():
    return synthetic.make_faces(np.arange(6) % 7, np.random.default_rng(4))


# ----------------------------------------------------------------------------- the layer table

@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_every_model_names_its_last_convolutional_block(name):
    """models.CAM_LAYER has an entry per model, it resolves to a module, and no convolution runs
    after that module's output: it is the last convolutional block."""
    assert set(models.CAM_LAYER) == set(models.MODEL_NAMES)
    model = models.FerNet(name).eval()
    layer = explain.cam_layer(model)
    inside = {id(m) for m in layer.modules()}
    order = []
    hooks = [m.register_forward_hook(lambda mod, a, out: order.append(id(mod)))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    shapes = []
    hooks.append(layer.register_forward_hook(lambda mod, a, out: shapes.append(out.shape)))
    with torch.no_grad():
        model(torch.rand(1, 1, 48, 48))
    for hook in hooks:
        hook.remove()
    assert order[-1] in inside
    assert len(shapes[0]) == 4 and shapes[0][-1] >= 6  # a spatial map


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_maps_have_the_face_size_and_are_finite(name, faces):
    torch.manual_seed(0)
    model = models.FerNet(name).eval()
    classes = np.arange(len(faces)) % 7
    maps = explain.grad_cam(model, faces, classes, batch_size=4)
    assert maps.shape == faces.shape and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    peaks = maps.reshape(len(maps), -1).max(1)
    assert np.all((np.abs(peaks - 1) < 1e-5) | (peaks == 0))  # scaled to peak at 1 (or empty)
    # Explaining leaves the model as it was: no gradients left behind, still in eval mode.
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_an_ensemble_map_is_the_average_of_its_members(faces):
    members = [random_model(0), random_model(1)]
    classes = np.full(len(faces), HAPPY)
    each = [explain.grad_cam(m, faces, classes) for m in members]
    both = explain.explain_faces(members, faces, classes)
    mean = (each[0] + each[1]) / 2
    expected = mean / mean.reshape(len(mean), -1).max(1)[:, None, None]
    np.testing.assert_allclose(both, expected, atol=1e-6)


# ----------------------------------------------------------------------------- it points at the mouth

EYES_AND_BROWS = ("eye_open", "brow_raise", "brow_slant", "brow_arch", "brow_asym")


def mouth_only_faces(labels, rng):
    """Synthetic faces whose expression is drawn only in the mouth: the eyes and brows of every
    face are a neutral face's. Returns (faces, mouth region masks (N, 48, 48)).

    Uses synthetic.py's drawing internals (_sample_params, _render) to swap those parameters.
    The mouth region is a box around the mouth's centre line, 0.6 face units each side across and
    0.4 up and down (one unit ~ 25 px): the widest mouth (0.41) and its deepest curve or opening
    (about 0.25) plus one 4-pixel cell of a 12x12 map, since the map is no sharper than its cells."""
    labels = np.asarray(labels)
    params = synthetic._sample_params(labels, rng)
    neutral = synthetic._sample_params(np.full(len(labels), NEUTRAL), rng)
    for key in EYES_AND_BROWS:
        params[key] = neutral[key]
    images = synthetic._render(params, rng.standard_normal((len(labels), 48, 48), dtype=np.float32))
    unit = synthetic._UNIT * params["scale"]
    down = params["mouth_y"] + 0.05  # the middle of the mouth, below the face's centre
    cx = params["cx"] - np.sin(params["tilt"]) * down * unit
    cy = params["cy"] + np.cos(params["tilt"]) * down * unit
    yy, xx = np.mgrid[0:48, 0:48] + 0.5
    box = ((np.abs(xx - cx[:, None, None]) < 0.6 * unit[:, None, None])
           & (np.abs(yy - cy[:, None, None]) < 0.4 * unit[:, None, None]))
    return images, box


class TinyNet(nn.Module):
    """Three conv blocks and global average pooling: it can only say which class by what its
    channels find, not by where, so its evidence must come from where the classes differ."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 2))

    def forward(self, x):
        x = (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 1e-3)
        return self.head(self.features(x))


def test_a_mouth_only_expression_is_explained_on_the_mouth():
    """Happy against Sad, drawn only in the mouth: after brief training (~10-25 s on one busy
    core) most of each map's mass lies in the mouth region, which covers under a third of the face.
    A map spread evenly, or on the eyes, would fail."""
    rng = np.random.default_rng(0)
    n, epochs, batch = 1600, 6, 32
    labels = rng.integers(0, 2, n)  # 0: Happy, 1: Sad
    images, _ = mouth_only_faces(np.array([HAPPY, SAD])[labels], rng)
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * (n // batch))
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    y = torch.from_numpy(labels)
    for _ in range(epochs):
        order = torch.randperm(n)
        for start in range(0, n - batch + 1, batch):
            idx = order[start:start + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()

    test_labels = np.arange(64) % 2
    test_images, mouth = mouth_only_faces(np.array([HAPPY, SAD])[test_labels], np.random.default_rng(1))
    with torch.no_grad():
        pred = model(torch.from_numpy(test_images).float().div(255).unsqueeze(1)).argmax(1).numpy()
    right = pred == test_labels
    assert right.mean() >= 0.8, f"the tiny model did not learn the mouths ({right.mean():.0%})"
    maps = explain.grad_cam(model, test_images, test_labels, layer=model.features)
    share = (maps * mouth).sum((1, 2)) / np.maximum(maps.sum((1, 2)), 1e-12)
    area = mouth.mean()
    assert area < 0.3
    assert share[right].mean() > 0.5, f"mouth holds {share[right].mean():.0%} of the maps' mass"
    assert share[right].mean() > 2 * area
    assert np.median(share[right]) > 0.5


# ----------------------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    return [save_checkpoint(folder / "a_best.pth", random_model(0)),
            save_checkpoint(folder / "b_best.pth", random_model(1, "vgg2_2_2"))]


def test_split_report_writes_a_map_beside_each_face_and_a_grid(ckpts, tmp_path, capsys):
    csv = synthetic.write_synthetic_csv(tmp_path / "faces.csv", 14, 7, 12, seed=5)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["-c", ckpts[0], "-d", csv, "-o", str(out), "--num_save", "5",
                                 "--explain", "--device", "cpu"], capsys)
    assert code == 0, err
    faces = sorted(f for f in os.listdir(out / "faces") if not f.endswith("_cam.png"))
    assert len(faces) == 5
    for face in faces:
        crop = cv2.imread(str(out / "faces" / face), cv2.IMREAD_GRAYSCALE)
        cam = cv2.imread(str(out / "faces" / face.replace(".png", "_cam.png")))
        assert cam.shape == (*crop.shape, 3)
    assert (out / "explain_grid.png").stat().st_size > 1000
    # Again without --explain: a new folder, without maps; the first one is kept as it was.
    code, _, err = run_cli(["-c", ckpts[0], "-d", csv, "-o", str(out), "--num_save", "3",
                            "--device", "cpu"], capsys)
    assert code == 0, err
    again = tmp_path / "out_2"
    assert len(os.listdir(again / "faces")) == 3 and not (again / "explain_grid.png").exists()
    assert len(os.listdir(out / "faces")) == 10 and (out / "explain_grid.png").exists()


def test_explain_class_and_an_ensemble_on_photos(ckpts, tmp_path, capsys):
    """--images --no-detect: every face gets cams/<annotated copy's name>_face0.png and _cam.png
    (so a.png and a.bmp keep apart); --explain_class in any case explains that class (and
    implies --explain)."""
    folder = tmp_path / "crops"
    (folder / "sub").mkdir(parents=True)
    images = synthetic.make_faces(np.array([3, 4, 6, 0]), np.random.default_rng(2))
    for i, image in enumerate(images[:3]):
        cv2.imwrite(str(folder / ("sub" if i == 2 else "") / f"face{i}.png"), image)
    cv2.imwrite(str(folder / "face0.bmp"), images[3])  # the same name as face0.png but for its extension
    out = tmp_path / "out"
    code, stdout, err = run_cli(["-c", *ckpts, "--images", str(folder), "--no-detect", "-o", str(out),
                                 "--explain_class", "sad", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "4 Grad-CAM map(s)" in stdout
    stems = ("crops/face0.png_face0", "crops/face1.png_face0", "crops/sub/face2.png_face0",
             "crops/face0.bmp_face0")
    for stem in stems:
        crop = cv2.imread(str(out / "cams" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE)
        assert crop.shape == (48, 48)
        assert cv2.imread(str(out / "cams" / f"{stem}_cam.png")).shape == (48, 48, 3)
    both = {cv2.imread(str(out / "cams" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE).tobytes()
            for stem in (stems[0], stems[3])}
    assert both == {images[0].tobytes(), images[3].tobytes()}  # neither overwrote the other
    np.testing.assert_array_equal(
        cv2.imread(str(out / "cams" / "crops/face1.png_face0.png"), cv2.IMREAD_GRAYSCALE), images[1])
    assert (out / "explain_grid.png").exists()
    # The map written is the ensemble's map of Sad for that face.
    models_ = predict.load_models(ckpts)
    expected = explain.explain_faces(models_, images[1:2], [SAD])[0]
    written = cv2.imread(str(out / "cams" / "crops/face1.png_face0_cam.png"))
    np.testing.assert_array_equal(written, explain.overlay(images[1], expected))


def test_a_split_report_beside_photos_keeps_its_own_folder_and_grid(ckpts, tmp_path, capsys):
    csv = synthetic.write_synthetic_csv(tmp_path / "faces.csv", 14, 7, 12, seed=5)
    folder = tmp_path / "crops"
    folder.mkdir()
    for i, image in enumerate(synthetic.make_faces(np.array([3, 4]), np.random.default_rng(2))):
        cv2.imwrite(str(folder / f"face{i}.png"), image)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["-c", ckpts[0], "-d", csv, "--images", str(folder), "--no-detect", "-o", str(out),
                                 "--num_save", "4", "--explain", "--device", "cpu"], capsys)
    assert code == 0, err
    grids = {cv2.imread(str(path)).shape for path in (out / "explain_grid.png", out / "report" / "explain_grid.png")}
    assert len(grids) == 2  # two grids: the photos' two faces and the split's four
    assert (out / "report" / "metrics.json").exists() and len(os.listdir(out / "report" / "faces")) == 8
    assert (out / "faces.csv").exists() and not (out / "metrics.json").exists()


def test_unknown_explain_class_suggests_the_closest(ckpts, capsys):
    code, _, err = run_cli(["-c", ckpts[0], "--images", "x.jpg", "--explain_class", "Suprise"], capsys)
    assert code == 2 and "did you mean Surprise?" in err and len(err.strip().splitlines()) == 1
