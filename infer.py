"""Reload checkpoints and judge them: metrics on a FER2013 split, or the faces in your own photos.

    python3 infer.py --checkpoint checkpoint/RUN/vgg2_0_2_best.pth -d synthetic
    python3 infer.py --checkpoint checkpoint/RUN/vgg2_4_2_conv3_best.pth -d data/fer2013.csv --tta tencrop
    python3 infer.py --checkpoint run1/vgg2_2_2_best.pth run2/vgg2_0_2_best.pth -d data/fer2013.csv
    python3 infer.py --checkpoint checkpoint/RUN/vgg2_0_2_best.pth --images photos/ me.jpg

The model name (and its input normalisation) comes from the checkpoint file. Several checkpoints
make an ensemble: their class probabilities are averaged.

On a FER2013-layout CSV (`-d`, default ./data/fer2013.csv; `synthetic` for the built-in faces)
the chosen `--split` (default test = PrivateTest) is classified in batches and the tool prints
loss, accuracy, macro-F1 and a per-class report, and writes to the output folder (`-o`, default
outputs/infer/<checkpoint folder>/<checkpoint name>):
    metrics.json                      everything printed, plus the confusion matrix as numbers
    predictions.csv                   one row per face: index, true and predicted label, 7 probabilities
    confusion_matrix.png              counts; confusion_matrix_normalized.png: rows sum to 1
    faces/<Emotion>_<index>.png       the first --num_save faces, named by the predicted emotion
    faces_grid.png                    those faces with true and predicted labels (green right, red wrong)
With `--tta flip|tencrop` the result without TTA is computed too: metrics.json keeps it under
"plain", and the files for it end in _plain.

With `--images PATH [PATH ...]` (files or folders, searched recursively) faces are found with
OpenCV's Haar cascade (`--no-detect`: each image is one already-cropped face), classified, and
written as annotated copies under <output>/annotated/ plus faces.csv and faces.json.
"""
import argparse
import contextlib
import glob
import math
import os
import re
import sys

import numpy as np
import torch
import torch.nn.functional as F

from models import MODEL_NAMES, FerNet
from train import load_checkpoint
from utils import (EMOTIONS, UserError, amp_dtype_for, atomic_write, check_writable,
                   eval_batch_size, reuse_freed_memory, save_json, select_device)

TTA_MODES = ("none", "flip", "tencrop")
SIDE = 48  # the models' input size
CROP = 44  # tencrop: crops of 44 x 44 pixels, resized back to 48 x 48
DEFAULT_CSV = "./data/fer2013.csv"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAX_PIXELS = 50_000_000  # larger photos: JPEGs are decoded at 1/2, 1/4 or 1/8 scale, others refused
MAX_FILE_BYTES = 1 << 30
DETECT_SIDE = 1280  # faces are searched on a copy of the photo at most this many pixels across
FACE_MARGIN = 0.1  # the crop adds this fraction of the detected box on every side
FLUSH_PIXELS = 100_000_000  # photos held in memory before their faces are classified and written
_SKIPPED_SHOWN = 10  # per folder, files that are not images named one by one


# ----------------------------------------------------------------------------- checkpoints

def model_from_checkpoint(ckpt, device="cpu", source=None):
    """Rebuild the model a checkpoint holds (its name and normalisation come from the file).

    `ckpt` is a dict from train.load_checkpoint; fp16-stored weights are fine. An unknown model
    name or weights that do not fit the model raise UserError."""
    where = f"{source}: " if source else ""
    name = ckpt.get("model_name")
    if name not in MODEL_NAMES:
        raise UserError(f"{where}the checkpoint holds a model named {name!r}, which this version of "
                        f"the tool does not know; known models: {', '.join(MODEL_NAMES)}")
    # A run with --ema_decay validated and selected its averaged weights: those are the model.
    state = ckpt["ema_state"] if ckpt.get("ema_state") is not None else ckpt.get("model_state")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{where}the checkpoint's model_state is not a set of weights")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    model = FerNet(name)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0][:300]
        raise UserError(f"{where}the weights in the checkpoint do not fit a {name} ({first})") from err
    return model.to(device).eval()


def resolve_checkpoint(path):
    """A checkpoint file; a run folder holding exactly one *_best.pth stands for that file."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return path
    best = sorted(glob.glob(os.path.join(path, "*_best.pth")))
    if len(best) == 1:
        return best[0]
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.pth")))
    raise UserError(f"{path} is a folder; pass a checkpoint file" +
                    (f" (it holds {', '.join(found)})" if found else " (it holds no .pth files)"))


def load_models(checkpoint_paths, device="cpu"):
    """Load one or more checkpoints: (models in eval mode, class names shared by all of them).

    Members of an ensemble must agree on the class names; any problem is a UserError."""
    if isinstance(checkpoint_paths, (str, os.PathLike)):
        checkpoint_paths = [checkpoint_paths]
    paths = [resolve_checkpoint(p) for p in checkpoint_paths]
    if not paths:
        raise UserError("no checkpoint given")
    models, class_names, first = [], None, None
    for path in paths:
        ckpt = load_checkpoint(path)
        models.append(model_from_checkpoint(ckpt, device, source=path))
        names = ckpt.get("class_names", list(EMOTIONS))
        if (not isinstance(names, (list, tuple)) or len(names) != len(EMOTIONS)
                or not all(isinstance(n, str) for n in names)):
            raise UserError(f"{path}: the checkpoint's class_names should be {len(EMOTIONS)} names, "
                            f"got {names!r}")
        names = list(names)
        if class_names is None:
            class_names, first = names, path
        elif names != class_names:
            raise UserError(f"the checkpoints do not agree on the classes, so they cannot be "
                            f"ensembled: {first} has {class_names}, {path} has {names}")
    return models, class_names


# ----------------------------------------------------------------------------- prediction

def tta_views(x, tta="none"):
    """The views of a float batch (B, 1, 48, 48) that `tta` averages over, as {name: batch}.

    none: the batch; flip: it and its horizontal mirror; tencrop: the four corner and the centre
    crops of 44 x 44 pixels, each resized back to 48 x 48 (bilinear), and their mirrors."""
    if tta == "none":
        return {"plain": x}
    if tta == "flip":
        return {"plain": x, "mirror": x.flip(-1)}
    if tta != "tencrop":
        raise ValueError(f"unknown tta {tta!r}; choose one of {', '.join(TTA_MODES)}")
    h, w = x.shape[-2:]
    views = {}
    corners = {"tl": (0, 0), "tr": (0, w - CROP), "bl": (h - CROP, 0), "br": (h - CROP, w - CROP),
               "centre": ((h - CROP) // 2, (w - CROP) // 2)}
    for name, (top, left) in corners.items():
        crop = F.interpolate(x[..., top:top + CROP, left:left + CROP], size=(h, w),
                             mode="bilinear", align_corners=False)
        views[f"crop_{name}"] = crop
        views[f"crop_{name}_mirror"] = crop.flip(-1)
    return views


def _as_faces(images):
    """uint8 (or float in [0, 1]) faces as a CPU tensor (N, 48, 48)."""
    if not isinstance(images, torch.Tensor):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or tuple(images.shape[1:]) != (SIDE, SIDE):
        raise ValueError(f"expected faces of shape (N, {SIDE}, {SIDE}), got {tuple(images.shape)}")
    return images


@torch.inference_mode()
def _predict(models, images, modes, batch_size, device):
    """{tta mode: probabilities (N, 7) float64} for each mode, in one pass over the batches
    (views shared by several modes, such as the plain one, are computed once)."""
    if isinstance(models, torch.nn.Module):
        models = [models]
    if not models:
        raise ValueError("no models to predict with")
    for mode in modes:
        if mode not in TTA_MODES:
            raise ValueError(f"unknown tta {mode!r}; choose one of {', '.join(TTA_MODES)}")
    device = torch.device(device)
    batch_size = eval_batch_size(batch_size, device)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive whole number, got {batch_size!r}")
    images = _as_faces(images)
    out = {mode: np.zeros((len(images), len(EMOTIONS)), np.float64) for mode in modes}
    for model in models:
        model.eval()
    for start in range(0, len(images), int(batch_size)):
        x = images[start:start + batch_size].to(device).unsqueeze(1)
        x = x.float().div_(255) if not x.is_floating_point() else x.float()
        views, per_mode = {}, {}
        for mode in modes:
            mode_views = tta_views(x, mode)
            views.update(mode_views)
            per_mode[mode] = list(mode_views)
        probs = {name: sum(F.softmax(m(v).float(), 1) for m in models) / len(models)
                 for name, v in views.items()}
        for mode in modes:
            p = torch.stack([probs[name] for name in per_mode[mode]]).mean(0)
            # float64 only after the move to the CPU: MPS has none
            out[mode][start:start + len(x)] = p.cpu().double().numpy()
    return out


def predict(models, images, tta="none", batch_size=None, device="cpu"):
    """Class probabilities (N, 7) float64 for faces (N, 48, 48) (uint8, or float in [0, 1]).

    Batched, under torch.inference_mode(). Probabilities are averaged over `models` (a model or a
    list: an ensemble) and over the test-time augmentation views of `tta` (none, flip, tencrop)."""
    return _predict(models, images, (tta,), batch_size, device)[tta]


# ----------------------------------------------------------------------------- metrics

def compute_metrics(probs, labels, class_names=EMOTIONS):
    """Loss, accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix
    of probabilities (N, 7) against labels; classes absent from a small split count as zero.

    Returns (metrics dict of plain Python values, scikit-learn's classification report text)."""
    from sklearn.metrics import classification_report, confusion_matrix
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    n = len(labels)
    if n == 0:
        raise UserError("there are no faces to evaluate")
    if probs.shape != (n, len(EMOTIONS)):
        raise ValueError(f"probabilities of shape {probs.shape} for {n} labels")
    if labels.min() < 0 or labels.max() >= len(EMOTIONS):
        raise ValueError(f"labels must lie in 0-{len(EMOTIONS) - 1}")
    pred = probs.argmax(1)
    classes = list(range(len(EMOTIONS)))
    names = list(class_names)
    table = classification_report(labels, pred, labels=classes, target_names=names,
                                  zero_division=0, output_dict=True)
    text = classification_report(labels, pred, labels=classes, target_names=names,
                                 zero_division=0, digits=4)
    per_class = {name: {"precision": float(table[name]["precision"]),
                        "recall": float(table[name]["recall"]),
                        "f1": float(table[name]["f1-score"]),
                        "support": int(table[name]["support"])} for name in names}
    metrics = {
        "n": int(n),
        "loss": float(-np.log(np.clip(probs[np.arange(n), labels], 1e-12, None)).mean()),
        "accuracy": float((pred == labels).mean()),
        "macro_f1": float(table["macro avg"]["f1-score"]),
        "weighted_f1": float(table["weighted avg"]["f1-score"]),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(labels, pred, labels=classes).tolist(),
    }
    return metrics, text


def evaluate_split(checkpoint_paths, images, labels, batch_size=None, device="cpu", tta="none"):
    """Loss, accuracy, macro-F1 and n of the (averaged) checkpoints on uint8 faces and labels."""
    models, class_names = load_models(checkpoint_paths, device)
    metrics, _ = compute_metrics(predict(models, images, tta, batch_size, device), labels, class_names)
    return {key: metrics[key] for key in ("loss", "accuracy", "macro_f1", "n")}


# ----------------------------------------------------------------------------- figures and files

def _figure(**kwargs):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    return Figure(**kwargs)


def _save_figure(fig, path, dpi=100):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    return path


def save_confusion_matrices(cm, class_names, out_dir, suffix="", title="confusion matrix"):
    """Two PNGs with ConfusionMatrixDisplay: counts, and rows normalised to 1 (recall on the
    diagonal). Returns their paths."""
    from sklearn.metrics import ConfusionMatrixDisplay
    cm = np.asarray(cm)
    rows = cm.sum(1, keepdims=True)
    normalised = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    paths = []
    for values, fmt, name, what in (
            (cm, "d", f"confusion_matrix{suffix}.png", "counts"),
            (normalised, ".2f", f"confusion_matrix{suffix}_normalized.png", "normalised by true class")):
        fig = _figure(figsize=(8, 7))
        ax = fig.subplots()
        ConfusionMatrixDisplay(values, display_labels=list(class_names)).plot(
            ax=ax, cmap="Blues", values_format=fmt, xticks_rotation=45, colorbar=True)
        ax.set_title(f"{title} ({what})")
        fig.tight_layout()
        paths.append(_save_figure(fig, os.path.join(out_dir, name)))
    return paths


def write_predictions(path, probs, labels, class_names):
    """predictions.csv: index in the split, true and predicted label (number and name), and the
    seven probabilities."""
    import pandas as pd
    names = np.asarray(class_names, dtype=object)
    labels = np.asarray(labels).astype(np.int64)
    pred = probs.argmax(1)
    table = pd.DataFrame({"index": np.arange(len(labels)), "true_label": labels,
                          "true_emotion": names[labels], "pred_label": pred,
                          "pred_emotion": names[pred]})
    for k, name in enumerate(class_names):
        table[f"p_{name}"] = probs[:, k]
    text = table.to_csv(index=False, float_format="%.6f", lineterminator="\n")
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def save_faces(images, labels, pred, class_names, out_dir, indices):
    """The faces at `indices` as <folder>/faces/<PredictedEmotion>_<index>.png (older such files
    in that folder are removed first, so the folder shows this run only)."""
    import cv2
    folder = os.path.join(out_dir, "faces")
    os.makedirs(folder, exist_ok=True)
    ours = re.compile(rf"^({'|'.join(re.escape(n) for n in class_names)})_\d+\.png$")
    for old in os.listdir(folder):
        if ours.match(old):
            os.remove(os.path.join(folder, old))
    paths = []
    for i in indices:
        path = os.path.join(folder, f"{class_names[pred[i]]}_{i}.png")
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(images[i]))
        atomic_write(path, lambda f: f.write(buf.tobytes()))
        paths.append(path)
    return paths


def save_face_grid(images, labels, probs, class_names, indices, path, title):
    """One image of the faces at `indices`, each titled with its true and predicted emotion
    (green when right, red when wrong)."""
    k = len(indices)
    cols = min(8, k)
    rows = math.ceil(k / cols)
    fig = _figure(figsize=(1.7 * cols, 2.3 * rows + 0.5))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    for ax, i in zip(axes, list(indices) + [None] * (len(axes) - k)):
        ax.axis("off")
        if i is None:
            continue
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        p = int(probs[i].argmax())
        right = p == int(labels[i])
        ax.set_title(f"#{i}\ntrue {class_names[labels[i]]}\npred {class_names[p]} {probs[i, p]:.0%}",
                     color="#1a7f37" if right else "#cf222e", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


# ----------------------------------------------------------------------------- evaluation report

def _describe(paths):
    names = [os.path.basename(p) for p in paths]
    return names[0] if len(names) == 1 else f"ensemble of {len(names)} ({', '.join(names)})"


def report(checkpoint_paths, images, labels, out_dir, tta="none", num_save=16, batch_size=None,
           device="cpu", split_name="test", log=print, models=None):
    """Classify a labelled split, print the summary and write every report file into `out_dir`.

    Returns the metrics dict (also saved as metrics.json): n, loss, accuracy, macro_f1,
    weighted_f1, per_class, confusion_matrix for the requested `tta`; when tta is not 'none',
    the same without TTA under "plain"; and tta, split, checkpoints, models, class_names, files.
    `models` (with its class names, from load_models) skips loading the checkpoints again."""
    if isinstance(checkpoint_paths, (str, os.PathLike)):
        checkpoint_paths = [checkpoint_paths]
    paths = [os.fspath(p) for p in checkpoint_paths]
    if tta not in TTA_MODES:
        raise UserError(f"unknown tta {tta!r}; choose one of {', '.join(TTA_MODES)}")
    if num_save < 0:
        raise UserError(f"num_save must be >= 0, got {num_save}")
    if models is None:
        models, class_names = load_models(paths, device)
    else:
        models, class_names = models
    images = np.asarray(images)
    labels = np.asarray(labels).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    check_writable(out_dir)

    modes = ("none",) if tta == "none" else ("none", tta)
    probs = _predict(models, images, modes, batch_size, device)
    results = {mode: compute_metrics(probs[mode], labels, class_names) for mode in modes}
    metrics, text = results[tta]
    tta_name = "without TTA" if tta == "none" else f"TTA {tta}"

    # Printed summary.
    log(f"{split_name} split: {len(labels)} faces, {_describe(paths)}")
    for mode in modes:
        m = results[mode][0]
        log(f"  {'without TTA' if mode == 'none' else 'TTA ' + mode:<12} loss {m['loss']:.4f}  "
            f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}")
    for mode in reversed(modes):
        log(f"per class ({'without TTA' if mode == 'none' else 'TTA ' + mode}):\n{results[mode][1]}")

    # Files.
    files = {}
    cm_paths = save_confusion_matrices(metrics["confusion_matrix"], class_names, out_dir,
                                       title=f"{split_name}, {tta_name}")
    files["confusion_matrix"], files["confusion_matrix_normalized"] = cm_paths
    files["predictions"] = write_predictions(os.path.join(out_dir, "predictions.csv"), probs[tta],
                                             labels, class_names)
    if tta != "none":
        plain = results["none"][0]
        cm_paths = save_confusion_matrices(plain["confusion_matrix"], class_names, out_dir, "_plain",
                                           title=f"{split_name}, without TTA")
        files["confusion_matrix_plain"], files["confusion_matrix_plain_normalized"] = cm_paths
        files["predictions_plain"] = write_predictions(
            os.path.join(out_dir, "predictions_plain.csv"), probs["none"], labels, class_names)
    else:  # files for the result without TTA from an earlier run would not match this one
        for name in ("confusion_matrix_plain.png", "confusion_matrix_plain_normalized.png",
                     "predictions_plain.csv"):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    indices = list(range(min(num_save, len(labels))))
    pred = probs[tta].argmax(1)
    files["faces"] = save_faces(images, labels, pred, class_names, out_dir, indices)
    grid = os.path.join(out_dir, "faces_grid.png")
    if not indices and os.path.exists(grid):
        os.remove(grid)  # from an earlier run: it would not match this one
    if indices:
        files["faces_grid"] = save_face_grid(
            images, labels, probs[tta], class_names, indices, grid,
            f"{split_name}: first {len(indices)} faces, {tta_name} (green right, red wrong)")

    result = {"tta": tta, "split": split_name, **metrics}
    if tta != "none":
        result["plain"] = results["none"][0]
    result.update(checkpoints=[os.path.abspath(p) for p in paths],
                  models=[getattr(m, "name", type(m).__name__) for m in models],
                  class_names=list(class_names), classification_report=text, files=files)
    files["metrics"] = os.path.join(out_dir, "metrics.json")
    save_json(result, files["metrics"])
    log(f"wrote metrics.json, predictions.csv, confusion matrices, {len(indices)} faces and their "
        f"grid to {out_dir}")
    return result


# ----------------------------------------------------------------------------- your own photos

class Skipped(Exception):
    """An input file that cannot be used; the message says why."""


@contextlib.contextmanager
def _no_pil_size_limit():
    """Let PIL read the header of any size: the pixel limit is checked here, before decoding."""
    from PIL import Image
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def read_image(path, max_pixels=None):
    """Decode a photo as BGR uint8 without ever holding more than about `max_pixels` pixels
    (default MAX_PIXELS): the size is read from the header first; larger JPEGs are decoded at
    1/2, 1/4 or 1/8 scale (libjpeg scales while decoding), larger other formats are refused.

    Returns (image, factor: 1, 2, 4 or 8, the downscaling, note: None or what was done);
    raises Skipped."""
    import cv2
    from PIL import Image, UnidentifiedImageError
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise Skipped(f"cannot be read ({err.strerror or err})") from err
    if size == 0:
        raise Skipped("is an empty (zero-byte) file")
    if size > MAX_FILE_BYTES:
        raise Skipped(f"is {size / 2**30:.1f} GiB, too large a file for a photo; refused")
    try:
        with _no_pil_size_limit(), Image.open(path) as im:
            (w, h), fmt = im.size, im.format
    except UnidentifiedImageError as err:
        raise Skipped("is not an image this tool can read (or it is corrupt)") from err
    except OSError as err:
        raise Skipped(f"cannot be read ({err.strerror or err})") from err
    except Exception as err:  # PIL raises several kinds on malformed headers
        raise Skipped(f"is not a readable image ({type(err).__name__}: {err})") from err
    flags, factor, note = cv2.IMREAD_COLOR, 1, None
    if w * h > max_pixels:
        megapixels = (f"{w}x{h} pixels ({w * h / 1e6:.0f} megapixels, above the limit of "
                      f"{max_pixels / 1e6:g})")
        if fmt not in ("JPEG", "MPO"):
            raise Skipped(f"is {megapixels}; refused without decoding it (only JPEG photos are "
                          "downscaled while decoding: shrink it or save it as JPEG)")
        factor = next((f for f in (2, 4, 8) if math.ceil(w / f) * math.ceil(h / f) <= max_pixels), None)
        if factor is None:
            raise Skipped(f"is {megapixels}, too large even at 1/8 scale; refused without decoding it")
        flags = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                 8: cv2.IMREAD_REDUCED_COLOR_8}[factor]
        note = (f"is {megapixels}; downscaled while decoding, to 1/{factor} "
                f"({math.ceil(w / factor)}x{math.ceil(h / factor)})")
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as err:
        raise Skipped(f"cannot be read ({err.strerror or err})") from err
    image = cv2.imdecode(data, flags)
    if image is None or image.size == 0:
        raise Skipped(f"could not be decoded as a {fmt} image (corrupt or truncated?)")
    return image, factor, note


def find_images(paths, skip):
    """Expand files and folders (recursively) into [(path, output name)], in sorted order.

    Files named explicitly are tried whatever their extension; in folders only jpg, jpeg, png,
    bmp and webp files (any case) are taken. Everything else is passed to skip(path, reason,
    quiet): quiet True after the first few files of a folder that are not images, and None for
    the line that counts the rest (a message, not an input)."""
    found, seen = [], set()

    def add(path, name):
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            found.append((path, name))

    for given in paths:
        given = os.fspath(given)
        if not os.path.exists(given):
            skip(given, "does not exist (no such file or folder)", False)
        elif os.path.isdir(given):
            root = os.path.basename(os.path.normpath(os.path.abspath(given))) or "root"
            others = []

            def unreadable(err):
                skip(err.filename, f"is a folder that cannot be read ({err.strerror or err})", False)

            for folder, dirs, files in os.walk(given, onerror=unreadable):
                dirs.sort()
                for file in sorted(files):
                    path = os.path.join(folder, file)
                    if file.lower().endswith(IMAGE_EXTENSIONS):
                        add(path, os.path.join(root, os.path.relpath(path, given)))
                    else:
                        others.append(path)
            kinds = ", ".join(e[1:] for e in IMAGE_EXTENSIONS)
            for k, path in enumerate(others):
                skip(path, f"is not an image file ({kinds})", k >= _SKIPPED_SHOWN)
            if len(others) > _SKIPPED_SHOWN:
                skip(given, f"holds {len(others) - _SKIPPED_SHOWN} more files that are not images", None)
        else:
            add(given, os.path.basename(given))
    return found


def face_detector():
    """OpenCV's frontal-face Haar cascade, shipped inside opencv-python(-headless) 4."""
    import cv2
    try:
        path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
    except AttributeError as err:
        raise UserError("this OpenCV has no bundled Haar cascades (OpenCV 5 dropped them); install "
                        "opencv-python-headless<5, or pass --no-detect for already-cropped "
                        "faces") from err
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise UserError(f"OpenCV's face detector {path} could not be loaded; reinstall "
                        "opencv-python-headless<5, or pass --no-detect for already-cropped faces")
    return cascade


def detect_faces(cascade, grey):
    """Face boxes [(x, y, w, h)] in a grey image, left to right. The search runs on a copy at
    most DETECT_SIDE pixels across (fast on big photos); boxes are in the full image's pixels."""
    import cv2
    h, w = grey.shape
    scale = min(1.0, DETECT_SIDE / max(h, w))
    small = grey if scale == 1.0 else cv2.resize(
        grey, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    found = cascade.detectMultiScale(small, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
    boxes = []
    for x, y, bw, bh in (found if len(found) else []):
        x0, y0 = int(round(x / scale)), int(round(y / scale))
        x1, y1 = min(w, int(round((x + bw) / scale))), min(h, int(round((y + bh) / scale)))
        boxes.append((x0, y0, x1 - x0, y1 - y0))
    return sorted(boxes)


def crop_face(grey, box, margin=FACE_MARGIN):
    """The face in `box` plus `margin` of its size on each side (within the image), as 48x48."""
    import cv2
    x, y, w, h = box
    extra = margin * max(w, h)
    height, width = grey.shape
    x0, y0 = max(0, int(round(x - extra))), max(0, int(round(y - extra)))
    x1, y1 = min(width, int(round(x + w + extra))), min(height, int(round(y + h + extra)))
    crop = grey[y0:y1, x0:x1]
    shrink = crop.shape[0] > SIDE or crop.shape[1] > SIDE
    return cv2.resize(crop, (SIDE, SIDE), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def annotate(image, faces):
    """Draw a box and 'Emotion 87%' per face [(box, emotion, confidence)] on a BGR image in
    place; an image without faces gets a 'no face found' note."""
    import cv2
    font = cv2.FONT_HERSHEY_SIMPLEX
    height, width = image.shape[:2]
    if not faces:
        scale = max(0.5, max(height, width) / 1000)
        thick = max(1, round(scale * 2))
        (tw, th), base = cv2.getTextSize("no face found", font, scale, thick)
        cv2.rectangle(image, (0, 0), (tw + 8, th + base + 8), (255, 255, 255), -1)
        cv2.putText(image, "no face found", (4, th + 4), font, scale, (0, 0, 200), thick, cv2.LINE_AA)
        return image
    for (x, y, w, h), emotion, confidence in faces:
        thick = max(1, round(max(w, h) / 100))
        scale = max(0.4, min(3.0, w / 160))
        cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), (0, 200, 0), thick)
        text = f"{emotion} {confidence:.0%}"
        (tw, th), base = cv2.getTextSize(text, font, scale, max(1, thick // 2))
        top = y - th - base - 2 * thick  # the label above the box, or below it at the top edge
        if top < 0:
            top = min(height - th - base, y + h)
        cv2.rectangle(image, (x, top), (x + tw + 4, top + th + base + 4), (0, 200, 0), -1)
        cv2.putText(image, text, (x + 2, top + th + 2), font, scale, (0, 0, 0), max(1, thick // 2),
                    cv2.LINE_AA)
    return image


def _write_image(path, image):
    import cv2
    ext = os.path.splitext(path)[1].lower()
    ok, buf = cv2.imencode(ext if ext in IMAGE_EXTENSIONS else ".png", image)
    if not ok:
        raise OSError(f"could not encode {path}")
    atomic_write(path, lambda f: f.write(buf.tobytes()))


def classify_photos(inputs, models, class_names, out_dir, detect=True, tta="none", batch_size=None,
                    device="cpu", log=print, warn=None):
    """Find, crop and classify the faces in photos (files or folders); write annotated copies
    under out_dir/annotated/ and faces.csv / faces.json (face boxes x, y, w, h in the pixels of
    the file; images without a face get one row with emotion 'no face'). Unusable inputs are
    reported through `warn` (default: a warning line on stderr) and skipped.

    Returns {"processed": n, "skipped": [{file, reason}], "faces": [...], csv, json, ...};
    raises UserError when not a single image could be processed."""
    import cv2
    import pandas as pd
    from tqdm import tqdm
    batch_size = eval_batch_size(batch_size, device)

    def default_warn(message):
        tqdm.write(f"warning: {message}", file=sys.stderr)

    warn = warn or default_warn
    skipped = []

    def skip(path, reason, quiet=False):
        if not quiet:
            warn(f"{path} {reason}; skipped")
        if quiet is not None:
            skipped.append({"file": path, "reason": reason})

    entries = find_images(inputs, skip)
    cascade = face_detector() if detect else None
    annotated_dir = os.path.join(out_dir, "annotated")
    used_names = set()
    rows, pending, processed = [], [], 0
    pending_pixels = pending_faces = 0

    def output_name(name):
        stem, ext = os.path.splitext(name)
        ext = ext.lower() if ext.lower() in IMAGE_EXTENSIONS else ".png"
        candidate, k = stem + ext, 1
        while candidate.lower() in used_names:
            k += 1
            candidate = f"{stem}_{k}{ext}"
        used_names.add(candidate.lower())
        return candidate

    def flush():
        nonlocal pending_pixels, pending_faces
        crops = [c for item in pending for c in item["crops"]]
        probs = predict(models, np.stack(crops), tta, batch_size, device) if crops else np.zeros((0, 7))
        k = 0
        for item in pending:
            drawn = []
            target = os.path.join(annotated_dir, output_name(item["name"]))
            for j, box in enumerate(item["boxes"]):
                p = probs[k]
                k += 1
                best = int(p.argmax())
                drawn.append((box, class_names[best], float(p[best])))
                x, y, w, h = (int(v) * item["factor"] for v in box)  # in the file's own pixels
                rows.append({"file": item["path"], "face": j, "x": x, "y": y, "w": w, "h": h,
                             "emotion": class_names[best], "confidence": float(p[best]),
                             **{f"p_{n}": float(v) for n, v in zip(class_names, p)},
                             "annotated": target})
            if not item["boxes"]:
                rows.append({"file": item["path"], "face": None, "x": None, "y": None, "w": None,
                             "h": None, "emotion": "no face", "confidence": None,
                             **{f"p_{n}": None for n in class_names}, "annotated": target})
            try:
                _write_image(target, annotate(item["image"], drawn))
            except OSError as err:
                warn(f"{target}: could not write the annotated copy ({err})")
        pending.clear()
        pending_pixels = pending_faces = 0

    bar = tqdm(entries, desc="photos", unit="image", disable=len(entries) < 2, file=sys.stderr,
               dynamic_ncols=True)
    for path, name in bar:
        try:
            image, factor, note = read_image(path)
        except Skipped as why:
            skip(path, str(why))
            continue
        if note:
            warn(f"{path} {note}")
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        boxes = detect_faces(cascade, grey) if detect else [(0, 0, grey.shape[1], grey.shape[0])]
        crops = [crop_face(grey, box, FACE_MARGIN if detect else 0.0) for box in boxes]
        pending.append({"path": path, "name": name, "image": image, "boxes": boxes, "crops": crops,
                        "factor": factor})
        processed += 1
        pending_pixels += image.size
        pending_faces += len(boxes)
        if pending_pixels >= FLUSH_PIXELS or pending_faces >= batch_size or len(pending) >= 64:
            flush()
    flush()
    bar.close()

    if processed == 0:
        what = f"none of the {len(entries)} image files" if entries else "no image files were found"
        raise UserError(f"nothing could be processed: {what}"
                        f"{' could be read' if entries else ''} in {', '.join(map(str, inputs))}")

    columns = ["file", "face", "x", "y", "w", "h", "emotion", "confidence",
               *[f"p_{n}" for n in class_names], "annotated"]
    table = pd.DataFrame(rows, columns=columns)
    for col in ("face", "x", "y", "w", "h"):
        table[col] = table[col].astype("Int64")
    csv_text = table.to_csv(index=False, float_format="%.6f", lineterminator="\n")
    csv_path = os.path.join(out_dir, "faces.csv")
    atomic_write(csv_path, lambda f: f.write(csv_text.encode()))
    faces_json = [{"file": r["file"], "face": r["face"],
                   "box": None if r["x"] is None else [r["x"], r["y"], r["w"], r["h"]],
                   "emotion": r["emotion"], "confidence": r["confidence"],
                   "probabilities": None if r["x"] is None else {n: r[f"p_{n}"] for n in class_names},
                   "annotated": r["annotated"]} for r in rows]
    json_path = os.path.join(out_dir, "faces.json")
    result = {"processed": processed, "skipped": skipped, "tta": tta, "detect": detect,
              "class_names": list(class_names), "faces": faces_json}
    save_json(result, json_path)

    found = [r for r in rows if r["x"] is not None]
    no_face = sum(r["x"] is None for r in rows)
    log(f"{processed} image(s) processed: {len(found)} face(s), {no_face} image(s) without a face, "
        f"{len(skipped)} input(s) skipped")
    if found:
        counts = {n: sum(r["emotion"] == n for r in found) for n in class_names}
        log("  " + ", ".join(f"{n} {c}" for n, c in counts.items() if c))
    if no_face and detect:
        log("  (no face found: if those images are already-cropped faces, pass --no-detect)")
    log(f"wrote faces.csv, faces.json and annotated copies to {out_dir}")
    return dict(result, csv=csv_path, json=json_path, annotated_dir=annotated_dir)


# ----------------------------------------------------------------------------- command line

def default_output_dir(paths):
    """outputs/infer/<checkpoint's folder>/<checkpoint name>; ensembles: outputs/infer/ensemble/a+b."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(paths) == 1:
        parent = os.path.basename(os.path.dirname(os.path.abspath(paths[0])))
        return os.path.join("outputs", "infer", parent, stems[0])
    return os.path.join("outputs", "infer", "ensemble", "+".join(stems)[:120])


def get_args_parser():
    p = argparse.ArgumentParser(
        prog="infer.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Judge trained checkpoints on a FER2013 split, or classify the faces in "
                    "your photos.",
        epilog="examples:\n" + __doc__.split("\n\n")[1])
    p.add_argument("--checkpoint", "-c", nargs="+", required=True, metavar="PATH",
                   help="checkpoint file(s) (or a run folder with one *_best.pth); several make an "
                        "ensemble whose probabilities are averaged")
    p.add_argument("-d", "--dataset", default=None,
                   help=f"FER2013-layout CSV, or 'synthetic' (default {DEFAULT_CSV}; with --images "
                        "a split is evaluated only when -d is given)")
    p.add_argument("--split", choices=("train", "val", "test"), default="test",
                   help="which split to evaluate: Training, PublicTest or PrivateTest (default test)")
    p.add_argument("-o", "--output", default=None,
                   help="output folder (default outputs/infer/<checkpoint folder>/<checkpoint name>)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=None,
                   help="faces per batch (default 64 on a CPU, 512 on a GPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision: bf16 on GPUs and CPUs that compute it natively (about 2x "
                        "faster on such a CPU), fp16 on older GPUs; accuracy within ~0.1 point")
    p.add_argument("--num_save", "--num-save", type=int, default=16,
                   help="faces of the split saved as images and shown in the grid (default 16)")
    p.add_argument("--tta", choices=TTA_MODES, default="none",
                   help="test-time augmentation: flip (mirror) or tencrop (corners, centre, mirrors); "
                        "the result without it is reported too")
    p.add_argument("--images", nargs="+", metavar="PATH",
                   help="photos or folders of photos (jpg, jpeg, png, bmp, webp) to classify")
    p.add_argument("--no-detect", "--no_detect", dest="detect", action="store_false",
                   help="with --images: each image is one already-cropped face (no face detection)")
    p.add_argument("--skip_bad_rows", "--skip-bad-rows", action="store_true",
                   help="drop malformed CSV rows (with a warning that counts them)")
    p.add_argument("--export", metavar="FILE",
                   help="write a small inference-only copy of the checkpoint (fp16 weights, no "
                        "optimiser state) to FILE, then stop")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def export_checkpoint(path, destination):
    """An inference-only copy: fp16 weights and the run's description, no optimiser or RNG."""
    ckpt = load_checkpoint(path)
    model_from_checkpoint(ckpt, source=path)  # refuse to export what could not be loaded
    keep = ("format_version", "model_name", "class_names", "pretrained_used", "args", "history",
            "run_name", "dataset", "step", "epoch")
    small = {k: ckpt[k] for k in keep if k in ckpt}
    small["kind"] = "export"
    weights = ckpt["ema_state"] if ckpt.get("ema_state") is not None else ckpt["model_state"]
    small["model_state"] = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    atomic_write(destination, lambda f: torch.save(small, f))
    return destination


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.num_save < 0:
        parser.error("--num_save must be >= 0")
    device = select_device(args.device)
    reuse_freed_memory(device)  # each batch's large activations reuse memory, not fault it in again
    paths = [resolve_checkpoint(p) for p in args.checkpoint]
    if args.export:
        if len(paths) != 1:
            parser.error("--export takes one checkpoint")
        size = os.path.getsize(export_checkpoint(paths[0], args.export)) / 2**20
        print(f"wrote {args.export} ({size:.1f} MiB)")
        return 0
    out_dir = args.output or default_output_dir(paths)
    check_writable(out_dir)
    models, class_names = load_models(paths, device)
    amp_dtype = amp_dtype_for(device) if args.amp else None
    print(f"loaded {_describe(paths)}: {', '.join(m.name for m in models)} on {device.type}"
          + (f", {str(amp_dtype).split('.')[-1]} autocast" if amp_dtype else ""))
    if args.amp and amp_dtype is None:
        print(f"note: --amp needs CUDA or a CPU with bf16 support; computing in fp32 on {device.type}")
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        classify(args, paths, models, class_names, out_dir, device)
    return 0


def classify(args, paths, models, class_names, out_dir, device):
    """The split report and/or the photos the command line asks for."""
    if args.images is None or args.dataset is not None:
        import dataset
        data = dataset.load_fer2013(args.dataset or DEFAULT_CSV, args.skip_bad_rows)
        images, labels = data.split(args.split)
        report(paths, images, labels, out_dir, args.tta, args.num_save, args.batch_size, device,
               split_name=f"{args.split} ({dataset.SPLITS[args.split]})", models=(models, class_names))
    if args.images is not None:
        classify_photos(args.images, models, class_names, out_dir, args.detect, args.tta,
                        args.batch_size, device)


if __name__ == "__main__":
    from utils import run_cli
    sys.exit(run_cli(main))
