"""Reload checkpoints and judge them: metrics on a FER2013 split, or the faces in your own photos.

    python3 infer.py --images photos/ me.jpg      # the shipped default model
    python3 infer.py --checkpoint checkpoint/RUN/vgg2_0_2_best.pth -d synthetic
    python3 infer.py --checkpoint checkpoint/RUN/vgg2_4_2_conv3_best.pth -d data/fer2013.csv --tta tencrop
    python3 infer.py --checkpoint run1/vgg2_2_2_best.pth run2/vgg2_0_2_best.pth -d data/fer2013.csv
    python3 infer.py --checkpoint checkpoint/RUN/vgg2_0_2_best.pth --images photos/ me.jpg
    python3 infer.py --checkpoint pretrained/fer2013_vgg2_4_2_conv5.pth --video interview.mp4 clips/
    python3 infer.py --checkpoint pretrained/fer2013_vgg2_4_2_conv5.pth --video 0   # a camera, until Ctrl-C
    python3 infer.py --checkpoint pretrained/fer2013_vgg2_4_2_conv5.pth -d my_faces/ --split all

Without --checkpoint the shipped default, pretrained/fer2013_vgg2_4_2_conv5.pth, is used. The
model name (and its input normalisation) comes from the checkpoint file. Several checkpoints
make an ensemble: their class probabilities are averaged.

On a FER2013-layout CSV (`-d`, default ./data/fer2013.csv; `synthetic` for the built-in faces),
or a folder of face images (`-d DIR`, see folders.py; `--split all` for one the model was not
trained on), the chosen `--split` (default test = PrivateTest) is classified in batches and the
tool prints loss, accuracy, macro-F1 and a per-class report, and writes to the output folder
(`-o`, default outputs/infer/<checkpoint folder>/<checkpoint name>):
    metrics.json                      everything printed, plus the confusion matrix as numbers
    predictions.csv                   one row per face: index, (a folder's) file, true and predicted
                                      label, one probability per class
    confusion_matrix.png              counts; confusion_matrix_normalized.png: rows sum to 1
    faces/<Emotion>_<index>.png       the first --num_save faces, named by the predicted emotion
    faces_grid.png                    those faces with true and predicted labels (green right, red wrong)
With `--tta flip|tencrop` the result without TTA is computed too: metrics.json keeps it under
"plain", and the files for it end in _plain.

With `--images PATH [PATH ...]` (files or folders, searched recursively) faces are found with
OpenCV's Haar cascade (`--no-detect`: each image is one already-cropped face), classified, and
written as annotated copies under <output>/annotated/ plus faces.csv and faces.json.

With `--video PATH|INDEX [...]` (files, folders of videos, or camera numbers) each video gets its
own folder <output>/<video name>/ with frames.csv (one row per face per analysed frame, written
as it goes), annotated.mp4, timeline.png and summary.json (see photos.classify_video).

`--explain` adds Grad-CAM maps (explain.py) of the predicted class, or of `--explain_class`: for a
split, faces/<Emotion>_<index>_cam.png beside each saved face; for photos, every face found as
cams/<photo>_face<j>.png and cams/<photo>_face<j>_cam.png; and explain_grid.png, the faces beside
their maps. `--export model.onnx` writes an ONNX model (onnx_model.py); `--checkpoint model.onnx`
runs every report through onnxruntime.
"""
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import dataset
import explain
import folders
import onnx_model
import photos
from utils import (DEFAULT_CSV, EMOTIONS, SIDE, SPLITS, Parser, UserError, atomic_write,
                   autocast_dtype, check_writable, device_flags, eval_batch_size, flag, new_folder,
                   one_of, run_cli, save_figure, save_json, select_device)

TTA_MODES = ("none", "flip", "tencrop")
# The best single model of the long runs (README "Results"), found beside this script.
DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained",
                                  "fer2013_vgg2_4_2_conv5.pth")
CROP = 44  # tencrop: crops of 44 x 44 pixels, resized back to 48 x 48


# ----------------------------------------------------------------------------- checkpoints

def load_models(checkpoint_paths, device="cpu"):
    """Load one or more checkpoints (files, or run folders holding one *_best.pth) as models in
    eval mode; an .onnx file becomes an onnx_model.OnnxModel (onnxruntime on the CPU), which
    predict uses like the others. Any problem is a UserError."""
    if isinstance(checkpoint_paths, (str, os.PathLike)):
        checkpoint_paths = [checkpoint_paths]
    paths = [checkpoint.resolve(p) for p in checkpoint_paths]
    if not paths:
        raise UserError("no checkpoint given")
    # Channels-last convolutions: 1.05-1.6x faster on the dev CPU (tools/bench_onnx.py, fp32).
    models = [onnx_model.OnnxModel(p) if onnx_model.is_onnx(p)
              else checkpoint.build_model(checkpoint.load(p), device, source=p).to(
                  memory_format=torch.channels_last) for p in paths]
    model_classes(models)  # an ensemble must agree on its classes
    return models


def model_classes(models):
    """The class names of a model, or of the models of an ensemble (a UserError when they differ):
    FER2013's seven, or the classes of the folder a model was trained on."""
    models = [models] if isinstance(models, torch.nn.Module) else models
    names = list(dict.fromkeys(tuple(getattr(m, "class_names", EMOTIONS)) for m in models))
    if len(names) > 1:
        raise UserError("the models of an ensemble must have the same classes; these have "
                        + " / ".join(", ".join(n) for n in names))
    return names[0] if names else EMOTIONS


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
    out = {mode: np.zeros((len(images), len(model_classes(models))), np.float64) for mode in modes}
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


def detect_emotions(models, image, tta="none", detect=True, device="cpu"):
    """The faces in one picture and their emotions, for use from Python (as fer's
    FER().detect_emotions or deepface's analyze): `image` a photo's path or a BGR or grey uint8
    array (cv2.imread, a video frame), `models` from load_models. Returns one dict per face,
    {"box": (x, y, w, h) in the picture's pixels, "emotion": "Happy", "confidence": 0.93,
    "emotions": {"Angry": p, ...}}; `detect=False` takes the whole picture as one face."""
    factor = 1
    if isinstance(image, (str, os.PathLike)):
        try:
            image, factor, _ = photos.read_image(image)
        except photos.Skipped as why:
            raise ValueError(f"{image} {why}") from None
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"expected a BGR or grey uint8 picture, got a {image.dtype} array of shape {image.shape}")
    boxes, _, probs = photos.faces_in_image(
        image, lambda faces: predict(models, faces, tta, device=device),
        photos.face_detector() if detect else None)
    names = model_classes(models)
    return [{"box": tuple(int(v) * factor for v in box), "emotion": names[int(p.argmax())],
             "confidence": float(p.max()), "emotions": dict(zip(names, map(float, p)))}
            for box, p in zip(boxes, probs)]


# ----------------------------------------------------------------------------- metrics

def compute_metrics(probs, labels, class_names=EMOTIONS):
    """Loss, accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix
    of probabilities (N, classes) against labels; classes absent from a small split count as zero.

    Returns (metrics dict of plain Python values, scikit-learn's classification report text)."""
    from sklearn.metrics import classification_report, confusion_matrix
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels).astype(np.int64)
    n = len(labels)
    if n == 0:
        raise UserError("there are no faces to evaluate")
    if probs.shape != (n, len(class_names)):
        raise ValueError(f"probabilities of shape {probs.shape} for {n} labels")
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"labels must lie in 0-{len(class_names) - 1}")
    pred = probs.argmax(1)
    classes = list(range(len(class_names)))
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


# ----------------------------------------------------------------------------- figures and files

def save_confusion_matrices(cm, class_names, out_dir, suffix="", title="confusion matrix"):
    """Two PNGs with ConfusionMatrixDisplay: counts, and rows normalised to 1 (recall on the
    diagonal). Returns their paths."""
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay
    cm = np.asarray(cm)
    rows = cm.sum(1, keepdims=True)
    normalised = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    paths = []
    for values, fmt, name, what in (
            (cm, "d", f"confusion_matrix{suffix}.png", "counts"),
            (normalised, ".2f", f"confusion_matrix{suffix}_normalized.png", "normalised by true class")):
        fig = Figure(figsize=(8, 7))
        ax = fig.subplots()
        ConfusionMatrixDisplay(values, display_labels=list(class_names)).plot(
            ax=ax, cmap="Blues", values_format=fmt, xticks_rotation=45, colorbar=True)
        ax.set_title(f"{title} ({what})")
        fig.tight_layout()
        paths.append(save_figure(fig, os.path.join(out_dir, name)))
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
    and their Grad-CAM maps in that folder are removed first, so the folder shows this run only)."""
    import cv2
    folder = os.path.join(out_dir, "faces")
    os.makedirs(folder, exist_ok=True)
    ours = re.compile(rf"^({'|'.join(re.escape(n) for n in class_names)})_\d+(_cam)?\.png$")
    for old in os.listdir(folder):
        if ours.match(old):
            os.remove(os.path.join(folder, old))
    paths = []
    for i in indices:
        path = os.path.join(folder, f"{class_names[pred[i]]}_{i}.png")
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(images[i]))
        if not ok:
            raise OSError(f"could not encode {path} as PNG")
        atomic_write(path, lambda f: f.write(buf.tobytes()))
        paths.append(path)
    return paths


def save_face_grid(images, labels, probs, class_names, indices, path, title):
    """One image of the faces at `indices`, each titled with its true and predicted emotion
    (green when right, red when wrong)."""
    from matplotlib.figure import Figure
    k = len(indices)
    cols = min(8, k)
    rows = math.ceil(k / cols)
    fig = Figure(figsize=(1.7 * cols, 2.3 * rows + 0.5))
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
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- Grad-CAM

def explained_classes(probs, explain_class=None):
    """The class each face's map explains: the predicted one, or `explain_class` for all."""
    probs = np.asarray(probs)
    if explain_class is None:
        return probs.argmax(1)
    return np.full(len(probs), int(explain_class))


def _cam_note(models):
    return "" if len(models) == 1 else f", average of the {len(models)} members' maps"


def explain_saved_faces(models, images, labels, probs, indices, face_paths, explain_class, grid_path,
                        title, batch_size=None, device="cpu"):
    """Grad-CAM maps of the report's saved faces: <face>_cam.png beside each face file, and one
    grid of the faces beside their maps. Returns (map paths, grid path)."""
    faces = np.asarray(images)[indices]
    classes = explained_classes(np.asarray(probs)[indices], explain_class)
    cams = explain.explain_faces(models, faces, classes, batch_size or 64, device)
    paths = explain.save_cam_images(faces, cams, [explain.cam_path(p) for p in face_paths])
    titles, colors, names = [], [], model_classes(models)
    for i, c in zip(indices, classes):
        p = int(np.argmax(probs[i]))
        titles.append((f"#{i} true {names[labels[i]]}\npred {names[p]} {probs[i][p]:.0%}",
                       f"Grad-CAM: {names[c]}\n{probs[i][c]:.0%}"))
        colors.append("#1a7f37" if p == int(labels[i]) else "#cf222e")
    what = "predicted class" if explain_class is None else names[explain_class]
    grid = explain.save_explain_grid(faces, cams, titles, grid_path,
                                     f"{title} of the {what}{_cam_note(models)}", colors)
    return paths, grid


def report_maps(cams, grid, out_dir):
    print(f"wrote {len(cams)} Grad-CAM map(s) to {os.path.join(out_dir, 'cams')}"
          + (" and explain_grid.png" if grid else ""))


def explain_found_faces(models, found, out_dir, explain_class=None, batch_size=None, device="cpu",
                        grid_faces=64):
    """Grad-CAM maps of faces found in photos or video frames: `found` holds (name, faces, probs)
    per photo or frame. Writes cams/<name>_face<j>.png (the 48x48 crop) and
    cams/<name>_face<j>_cam.png, and explain_grid.png of the first `grid_faces` faces.
    Returns (map paths, grid path or None)."""
    import cv2
    faces, probs, stems = [], [], []
    for name, crops, p in found:
        stems += [os.path.join(out_dir, "cams", f"{name}_face{j}") for j in range(len(crops))]
        faces.append(crops)
        probs.append(np.asarray(p))
    if not stems:
        return [], None
    faces, probs = np.concatenate(faces), np.concatenate(probs)
    classes = explained_classes(probs, explain_class)
    cams = explain.explain_faces(models, faces, classes, batch_size or 64, device)
    for face, stem in zip(faces, stems):  # the crop the map belongs to, as the model saw it
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(face))
        if not ok:
            raise OSError(f"could not encode {stem}.png as PNG")
        atomic_write(f"{stem}.png", lambda f: f.write(buf.tobytes()))
    paths = explain.save_cam_images(faces, cams, [f"{stem}_cam.png" for stem in stems])
    k = min(grid_faces, len(faces))
    titles = []
    for stem, p, c in zip(stems[:k], probs[:k], classes[:k]):
        name = os.path.relpath(stem, os.path.join(out_dir, "cams"))
        titles.append((f"{name[-24:]}\n{EMOTIONS[int(p.argmax())]} {p.max():.0%}",
                       f"Grad-CAM: {EMOTIONS[c]}\n{p[c]:.0%}"))
    what = "predicted class" if explain_class is None else EMOTIONS[explain_class]
    shown = "" if k == len(faces) else f" (first {k} of {len(faces)} faces)"
    grid = explain.save_explain_grid(faces[:k], cams[:k], titles,
                                     os.path.join(out_dir, "explain_grid.png"),
                                     f"Grad-CAM of the {what}{_cam_note(models)}{shown}")
    return paths, grid


# ----------------------------------------------------------------------------- evaluation report

def _describe(paths):
    names = [os.path.basename(p) for p in paths]
    return names[0] if len(names) == 1 else f"ensemble of {len(names)} ({', '.join(names)})"


def report(checkpoint_paths, images, labels, out_dir, tta="none", num_save=16, batch_size=None,
           device="cpu", split_name="test", log=print, models=None, explain_maps=False,
           explain_class=None):
    """Classify a labelled split, print the summary and write every report file into `out_dir`.

    Returns the metrics dict (also saved as metrics.json): n, loss, accuracy, macro_f1,
    weighted_f1, per_class, confusion_matrix for the requested `tta`; when tta is not 'none',
    the same without TTA under "plain"; and tta, split, checkpoints, models, class_names, files.
    `models` (from load_models) skips loading the checkpoints again. `explain_maps`: Grad-CAM
    maps of the saved faces (see explain_saved_faces), of class index `explain_class` when given."""
    if isinstance(checkpoint_paths, (str, os.PathLike)):
        checkpoint_paths = [checkpoint_paths]
    paths = [os.fspath(p) for p in checkpoint_paths]
    if tta not in TTA_MODES:
        raise UserError(f"unknown tta {tta!r}; choose one of {', '.join(TTA_MODES)}")
    if num_save < 0:
        raise UserError(f"num_save must be >= 0, got {num_save}")
    models = load_models(paths, device) if models is None else models
    if explain_maps:
        for model in models:
            explain.cam_layer(model)  # fail before the work when a model cannot be explained
    class_names = model_classes(models)
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
    explain_grid = os.path.join(out_dir, "explain_grid.png")
    if os.path.exists(explain_grid) and not (explain_maps and indices):
        os.remove(explain_grid)  # from an earlier run
    if explain_maps and indices:
        files["cams"], files["explain_grid"] = explain_saved_faces(
            models, images, labels, probs[tta], indices, files["faces"], explain_class,
            explain_grid, f"{split_name}: Grad-CAM", batch_size, device)

    result = {"tta": tta, "split": split_name, **metrics}
    if tta != "none":
        result["plain"] = results["none"][0]
    result.update(checkpoints=[os.path.abspath(p) for p in paths],
                  models=[getattr(m, "name", type(m).__name__) for m in models],
                  class_names=list(class_names), classification_report=text, files=files)
    files["metrics"] = os.path.join(out_dir, "metrics.json")
    save_json(result, files["metrics"])
    log(f"wrote metrics.json, predictions.csv, confusion matrices, {len(indices)} faces and their "
        f"grid{' and Grad-CAM maps' if explain_maps and indices else ''} to {out_dir}")
    return result


# ----------------------------------------------------------------------------- command line

def default_output_dir(paths, images=False, kind="photos"):
    """outputs/infer/<checkpoint's folder>/<checkpoint name> (ensembles: outputs/infer/ensemble/
    a+b); photos and videos go to a photos_<time> or video_<time> folder inside it (`kind`), so
    each call keeps its own results."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(paths) == 1:
        parent = os.path.basename(os.path.dirname(os.path.abspath(paths[0])))
        folder = os.path.join("outputs", "infer", parent, stems[0])
    else:
        folder = os.path.join("outputs", "infer", "ensemble", "+".join(stems)[:120])
    return os.path.join(folder, time.strftime(f"{kind}_%Y%m%d-%H%M%S")) if images else folder


def emotion(value):
    """An argparse type: an emotion name in any case, with the closest name suggested on a typo."""
    by_lower = {name.lower(): name for name in EMOTIONS}
    return EMOTIONS.index(by_lower.get(value.lower()) or one_of(EMOTIONS, "emotion")(value))


def get_args_parser():
    p = Parser(prog="infer.py",
               description="Judge trained checkpoints on a FER2013 split, or classify the faces in "
                           "your photos and videos.",
               epilog="examples:\n" + __doc__.split("\n\n")[1])
    g = p.add_argument_group("model")
    flag(g, "--checkpoint", "-c", nargs="+", default=[DEFAULT_CHECKPOINT], metavar="PATH",
         help="checkpoint file(s) (.pth or .onnx, or a run folder with one *_best.pth); several "
              "make an ensemble whose probabilities are averaged (default: the shipped "
              "pretrained/fer2013_vgg2_4_2_conv5.pth)")
    flag(g, "--tta", choices=TTA_MODES, default="none",
         help="test-time augmentation: flip (mirror) or tencrop (corners, centre, mirrors); the "
              "result without it is reported too (default: none)")
    flag(g, "--export", metavar="FILE",
         help="write an inference-only copy of the checkpoint to FILE, then stop: FILE.onnx an fp32 "
              "ONNX model (dynamic batch, normalisation inside; needs onnxscript), any other name "
              "the small PyTorch file (fp16 weights, no optimiser state)")

    g = p.add_argument_group("split report")
    flag(g, "-d", "--dataset", default=None,
         help="FER2013-layout CSV, 'synthetic', or a folder of face images (DIR/<class>/* or "
              "DIR/<split>/<class>/*) (default: the data set the checkpoint was trained "
              f"on, else {DEFAULT_CSV}; with --images or --video a split is evaluated only when -d "
              "is given)")
    flag(g, "--split", choices=(*SPLITS, "all"), default="test",
         help="which split to evaluate: train, val or test (Training, PublicTest, PrivateTest; a "
              "folder's own, or held out of it), or all: every face, for a data set the model was "
              "not trained on (default: test)")
    dataset.faces_flag(g)
    flag(g, "--num_save", type=int, default=16,
         help="faces of the split saved as images and shown in the grid (default: 16)")
    flag(g, "--skip_bad_rows", action="store_true",
         help="drop malformed CSV rows (with a warning that counts them)")

    g = p.add_argument_group("photos and videos")
    flag(g, "--images", nargs="+", metavar="PATH",
         help="photos or folders of photos to classify (every format OpenCV reads)")
    flag(g, "--no_detect", dest="detect", action="store_false",
         help="with --images: each image is one already-cropped face (no face detection)")
    flag(g, "--video", nargs="+", metavar="PATH|INDEX",
         help="video files, folders of videos, or camera numbers (0: the first camera, until "
              "Ctrl-C): per-frame emotions of tracked faces, an annotated video, a timeline")
    flag(g, "--every", type=int, default=1, metavar="N",
         help="with --video: analyse every N-th frame (default: 1, all)")
    flag(g, "--detect_every", type=int, default=photos.DETECT_EVERY, metavar="K",
         help="with --video: look for faces on every K-th analysed frame, the tracker carries the "
              f"boxes in between (default: {photos.DETECT_EVERY}; 1: detect on every frame)")
    flag(g, "--no_smooth", dest="smooth", action="store_false",
         help=f"with --video: label each frame on its own in the annotated video (default: the mean "
              f"of a track's last {photos.SMOOTH_FRAMES} frames; frames.csv always has raw values)")
    flag(g, "--show", action="store_true",
         help="with --video: show the annotated frames in a window (needs OpenCV with GUI support; "
              "q or Esc there acts as Ctrl-C)")

    g = p.add_argument_group("explanations")
    flag(g, "--explain", action="store_true",
         help="Grad-CAM heat maps of the predicted class over each reported face: the --num_save "
              "faces of a split (faces/<Emotion>_<i>_cam.png), every face of --images "
              "(cams/<photo>_face<j>_cam.png beside the crop), and explain_grid.png; maps come from "
              "each model's last convolutional block, on the face without TTA; an ensemble shows "
              "the average of its members' maps; with --video see --explain_every")
    flag(g, "--explain_every", type=int, default=25, metavar="N",
         help="with --explain and --video: maps for the faces of every N-th analysed frame that has "
              "faces, in <video folder>/cams/frame<index>_face<j>_cam.png (default: 25)")
    flag(g, "--explain_class", type=emotion, metavar="EMOTION",
         help=f"with --explain (implied): explain this class instead of the predicted one "
              f"({', '.join(EMOTIONS)})")

    g = p.add_argument_group("output and hardware")
    flag(g, "-o", "--output", default=None,
         help="output folder (default: outputs/infer/<checkpoint folder>/<checkpoint name>, and "
              "a photos_<time> or video_<time> folder inside it for photos and videos)")
    flag(g, "--batch_size", type=int, default=None,
         help="faces per batch (default: 64 on a CPU, 512 on a GPU)")
    device_flags(g)
    flag(g, "--debug", action="store_true", help="show tracebacks")
    return p


def training_data(paths, given):
    """The data set to evaluate on: -d when given, else the one the (first) checkpoint was trained
    on when it is still there (the synthetic faces are drawn again), else ./data/fer2013.csv."""
    if given is not None:
        return given
    first = paths[0]
    trained_on = (onnx_model.OnnxModel(first).metadata if onnx_model.is_onnx(first)
                  else checkpoint.load(first)).get("dataset")
    if not trained_on:
        return DEFAULT_CSV
    if os.path.basename(trained_on) == os.path.basename(dataset.SYNTHETIC_CSV):
        trained_on = "synthetic"
    elif not os.path.exists(trained_on):
        print(f"note: {paths[0]} was trained on {trained_on}, which is not there any more; "
              f"evaluating on {DEFAULT_CSV} (-d to choose another)")
        return DEFAULT_CSV
    print(f"evaluating on {trained_on}, the data set the checkpoint was trained on (-d to choose another)")
    return trained_on


def evaluation_data(args, paths):
    """The data set to evaluate (see training_data). A folder the checkpoint was trained on must
    still hold the faces it was trained and tested on: if not, a note says what changed."""
    data = dataset.load_data(training_data(paths, args.dataset), args.skip_bad_rows, args.faces)
    if data.files is not None and not onnx_model.is_onnx(paths[0]):
        changed = folders.changes_since_training(data, checkpoint.load(paths[0]), paths[0])
        if changed:
            print(f"note: {changed}; these are not exactly the faces of the training run (its test "
                  "split may even hold faces the model was trained on)")
    return data


def report_split(data, paths, models, out_dir, args, device):
    """report() on --split of the data, in the models' classes. Faces of classes the models do not
    have (a folder's contempt) are left out of the metrics and reported apart, with what the
    models took them for; a folder's predictions.csv also names each face's file."""
    images, labels = data.split(args.split)
    names = model_classes(models)
    mapped = folders.to_classes(labels, data.class_names, names)
    known = mapped >= 0
    if not known.any():
        raise UserError(f"none of the classes of {folders.shown(data.source)} ({', '.join(data.class_names)}) "
                        f"is one of the model's ({', '.join(names)})")
    split_name = (args.split if data.files is not None else
                  f"{args.split} ({SPLITS.get(args.split, 'every row')})")
    result = report(paths, images[known], mapped[known], out_dir, args.tta, args.num_save,
                    args.batch_size, device, split_name=split_name, models=models,
                    explain_maps=args.explain or args.explain_class is not None,
                    explain_class=args.explain_class)
    if data.files is not None:
        files = np.asarray(data.files, dtype=object)[data.mask(args.split)][known]
        for key in ("predictions", "predictions_plain"):
            if key in result["files"]:
                folders.add_file_column(result["files"][key], files)
    if not known.all():
        probs = predict(models, images[~known], args.tta, args.batch_size, device)
        result["classes_not_in_model"] = folders.taken_for(labels[~known], probs, data.class_names, names)
        for name, seen in result["classes_not_in_model"].items():
            print(f"{name}: {seen['faces']} faces of a class the model does not have, left out of the "
                  "metrics; taken for " + ", ".join(f"{k} {v}" for k, v in seen["taken_for"].items()))
        save_json(result, result["files"]["metrics"])
    return result


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.num_save < 0:
        parser.error("--num_save must be >= 0")
    if args.every < 1 or args.detect_every < 1:
        parser.error("--every and --detect_every must be at least 1")
    if args.video is not None and not args.detect:
        parser.error("--no-detect applies to --images only (video frames are searched for faces)")
    video_flags = [name for name, used in (("--every", args.every != 1), ("--show", args.show),
                                           ("--detect_every", args.detect_every != photos.DETECT_EVERY),
                                           ("--no_smooth", not args.smooth)) if used]
    if video_flags and args.video is None:
        parser.error(f"{', '.join(video_flags)} apply to --video only")
    if args.explain_every < 1:
        parser.error("--explain_every must be at least 1")
    paths = [checkpoint.resolve(p) for p in args.checkpoint]
    explaining = args.explain or args.explain_class is not None
    if args.export:
        if len(paths) != 1:
            parser.error("--export takes one checkpoint")
        if onnx_model.is_onnx(paths[0]):
            raise UserError(f"{paths[0]} is already an ONNX file; export from the .pth checkpoint")
        if os.path.exists(args.export) and os.path.exists(paths[0]) and os.path.samefile(paths[0], args.export):
            raise UserError(f"--export {args.export} would replace the checkpoint it reads "
                            "(and lose its training state): choose another file name")
        size = os.path.getsize(checkpoint.export(paths[0], args.export)) / 2**20
        kind = (f"ONNX, opset {onnx_model.OPSET}, fp32, dynamic batch"
                if onnx_model.is_onnx(args.export) else "fp16 PyTorch")
        print(f"wrote {args.export} ({size:.1f} MiB, {kind})")
        return 0
    if explaining and any(onnx_model.is_onnx(p) for p in paths):
        raise UserError("--explain needs gradients, which ONNX files do not give: pass the .pth "
                        "checkpoint(s) for Grad-CAM")
    device = select_device(args.device)
    models = load_models(paths, device)
    if (args.images is not None or args.video is not None) and model_classes(models) != EMOTIONS:
        raise UserError(f"--images and --video need a model of FER2013's seven classes; this one has "
                        f"{', '.join(model_classes(models))} (evaluate it on a folder with -d)")
    data = None
    if (args.images is None and args.video is None) or args.dataset is not None:
        data = evaluation_data(args, paths)
    out_dir = args.output or default_output_dir(
        paths, images=args.images is not None or args.video is not None,
        kind="photos" if args.images else "video")
    if not args.output and (args.images is not None or args.video is not None):
        out_dir = new_folder(out_dir)  # its own folder, even beside a call started the same second
    check_writable(out_dir)
    amp_dtype = autocast_dtype(args.amp, device)
    onnx_note = (", ONNX through onnxruntime on the CPU"
                 if any(isinstance(m, onnx_model.OnnxModel) for m in models) else "")
    print(f"loaded {_describe(paths)}: {', '.join(m.name for m in models)} on {device.type}"
          + (f", {str(amp_dtype).split('.')[-1]} autocast" if amp_dtype else "") + onnx_note)
    if args.amp and amp_dtype is None:
        print(f"note: --amp needs CUDA or a CPU with bf16 support; computing in fp32 on {device.type}")
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        if data is not None:
            report_split(data, paths, models, out_dir, args, device)
        if args.images is not None:
            found = []  # with --explain: (annotated copy's name, its face crops, their probabilities)
            annotated = os.path.join(out_dir, "annotated")
            photos.classify_photos(
                args.images, lambda faces: predict(models, faces, args.tta, args.batch_size, device),
                out_dir, args.detect, on_faces=(lambda target, crops, probs: found.append(
                    (os.path.relpath(target, annotated), crops, probs))) if explaining else None)
            if explaining:
                report_maps(*explain_found_faces(models, found, out_dir, args.explain_class,
                                                 args.batch_size, device), out_dir)
        if args.video is not None:
            if device.type == "cpu":  # batches of 1-3 faces: a second thread only spins (README
                torch.set_num_threads(1)  # "Video": 2 against 21 frames/s), OpenCV has the other core
            frames = {}  # with --explain: video folder -> [(frame name, crops, probabilities)]

            def keep_frame(folder, name, crops, probs):  # every --explain_every-th frame with faces
                kept = frames.setdefault(folder, [])
                kept.append((name, crops, probs) if len(kept) % args.explain_every == 0 else None)
            photos.classify_videos(
                args.video, lambda faces: predict(models, faces, args.tta, args.batch_size, device),
                out_dir, args.every, args.detect_every, args.smooth, args.show,
                on_faces=keep_frame if explaining else None)
            for folder, kept in frames.items():
                report_maps(*explain_found_faces(models, [k for k in kept if k], folder,
                                                 args.explain_class, args.batch_size, device), folder)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
