"""Judging a model on a labelled split: metrics, confusion matrices, predictions.csv and a grid of
faces, written into a fresh folder (an earlier report is never overwritten or mixed in). The
split is judged in the model's classes (FER2013's seven, or a folder's): faces of classes the
model does not have are reported apart.
"""
import math
import os
from collections import Counter

import numpy as np

import checkpoint
import dataset
import folders
import onnx_model
import predict
from utils import DEFAULT_CSV, EMOTIONS, SPLITS, UserError, atomic_write, new_folder, printable, save_figure, save_json


def compute_metrics(probs, labels, class_names=EMOTIONS):
    """Loss, accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix
    of probabilities (N, classes) against labels. The averages take the classes that are in the
    split or predicted (scikit-learn's default; `macro_f1_classes` names them): a class that is
    neither, e.g. Disgust in a small split or one the folder lacks, would add an F1 of 0 to the
    mean. per_class and the confusion matrix keep every class of the model.

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
    seen = sorted(set(labels.tolist()) | set(pred.tolist()))
    averaged = classification_report(labels, pred, labels=seen, zero_division=0, output_dict=True)
    text = classification_report(labels, pred, labels=seen, target_names=[names[c] for c in seen],
                                 zero_division=0, digits=4)
    per_class = {name: {"precision": float(table[name]["precision"]),
                        "recall": float(table[name]["recall"]),
                        "f1": float(table[name]["f1-score"]),
                        "support": int(table[name]["support"])} for name in names}
    metrics = {
        "n": int(n),
        "loss": float(-np.log(np.clip(probs[np.arange(n), labels], 1e-12, None)).mean()),
        "accuracy": float((pred == labels).mean()),
        "macro_f1": float(averaged["macro avg"]["f1-score"]),
        "weighted_f1": float(averaged["weighted avg"]["f1-score"]),
        "macro_f1_classes": [names[c] for c in seen],
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(labels, pred, labels=classes).tolist(),
    }
    return metrics, text


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
    """predictions.csv: index in the split, true and predicted label (number and name), and one
    probability per class."""
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
    """The faces at `indices` as <out_dir>/faces/<PredictedEmotion>_<index>.png."""
    import cv2
    folder = os.path.join(out_dir, "faces")
    os.makedirs(folder, exist_ok=True)
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


def training_data(paths, given):
    """The data set to evaluate on: -d when given, else the one the (first) checkpoint was trained
    on when it is at that path (the synthetic faces are drawn again), else ./data/fer2013.csv.
    With none of them there, a UserError says what infer.py can do instead."""
    if given is not None:
        return given
    first = paths[0]
    trained_on = (onnx_model.OnnxModel(first).metadata if onnx_model.is_onnx(first)
                  else checkpoint.load(first)).get("dataset")
    if trained_on and os.path.basename(trained_on) == os.path.basename(dataset.SYNTHETIC_CSV):
        trained_on = "synthetic"
    if trained_on == "synthetic" or trained_on and os.path.exists(trained_on):
        print(f"evaluating on {trained_on}, the data set the checkpoint was trained on (-d to choose another)")
        return trained_on
    if os.path.exists(DEFAULT_CSV):
        print(f"evaluating on {DEFAULT_CSV} (-d to choose another)")
        return DEFAULT_CSV
    raise UserError("nothing to do: pass --images PHOTO ... or --video FILE ... to classify the faces "
                    "in your pictures, or -d FER2013.csv to evaluate on a labelled split "
                    f"({DEFAULT_CSV} is not there; README 'Getting FER2013')")


def evaluation_data(paths, given, skip_bad_rows=False, faces="auto"):
    """The data set to evaluate (training_data), as a dataset.FerData. A folder the checkpoint was
    trained on must still hold the faces it was trained and tested on: if not, a note says what
    changed."""
    data = dataset.load_data(training_data(paths, given), skip_bad_rows, faces)
    if data.files is not None and not onnx_model.is_onnx(paths[0]):
        changed = folders.changes_since_training(data, checkpoint.load(paths[0]), paths[0])
        if changed:
            print(f"note: {changed}; these are not exactly the faces of the training run (its test "
                  "split may even hold faces the model was trained on)")
    return data


def describe(models):
    """The model files of a report in a few words."""
    names = [os.path.basename(getattr(m, "source", m.name)) for m in models]
    return names[0] if len(names) == 1 else f"ensemble of {len(names)} ({', '.join(names)})"


def report(models, images, labels, out_dir, tta="none", num_save=16, batch_size=None, device="cpu",
           split_name="test", log=print):
    """Classify a labelled split with `models` (predict.load_models), print the summary and write
    every report file into a new folder: `out_dir` (missing or empty), else out_dir_2, _3, ...

    Returns the metrics dict (also saved as metrics.json): n, loss, accuracy, macro_f1,
    weighted_f1, per_class, confusion_matrix for the requested `tta`; when tta is not 'none',
    the same without TTA under "plain"; and tta, split, checkpoints, models, class_names, files,
    folder, and probs (the probabilities, not saved in metrics.json)."""
    if tta not in predict.TTA_MODES:
        raise UserError(f"unknown tta {tta!r}; choose one of {', '.join(predict.TTA_MODES)}")
    if num_save < 0:
        raise UserError(f"num_save must be >= 0, got {num_save}")
    images, labels = np.asarray(images), np.asarray(labels).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    out_dir = new_folder(out_dir, empty_is_new=True)
    modes = ("none",) if tta == "none" else ("none", tta)
    probs = predict.predict_modes(models, images, modes, batch_size, device)
    class_names = predict.model_classes(models)
    results = {mode: compute_metrics(probs[mode], labels, class_names) for mode in modes}
    metrics, text = results[tta]
    tta_name = "without TTA" if tta == "none" else f"TTA {tta}"
    log(f"{split_name} split: {len(labels)} faces, {describe(models)}")
    for mode in modes:
        m = results[mode][0]
        log(f"  {'without TTA' if mode == 'none' else 'TTA ' + mode:<12} loss {m['loss']:.4f}  "
            f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}"
            + (f" (over the {len(m['macro_f1_classes'])} classes present or predicted)"
               if len(m["macro_f1_classes"]) < len(class_names) else ""))
    for mode in reversed(modes):
        log(f"per class ({'without TTA' if mode == 'none' else 'TTA ' + mode}):\n{results[mode][1]}")

    files = {}
    for mode in modes:  # the result without TTA, beside a TTA result, in files ending in _plain
        suffix = "_plain" if mode != tta else ""
        title = f"{split_name}, {'without TTA' if mode == 'none' else tta_name}"
        paths = save_confusion_matrices(results[mode][0]["confusion_matrix"], class_names, out_dir, suffix, title)
        files[f"confusion_matrix{suffix}"], files[f"confusion_matrix{suffix}_normalized"] = paths
        files[f"predictions{suffix}"] = write_predictions(
            os.path.join(out_dir, f"predictions{suffix}.csv"), probs[mode], labels, class_names)
    indices = list(range(min(num_save, len(labels))))
    if indices:
        files["faces"] = save_faces(images, labels, probs[tta].argmax(1), class_names, out_dir, indices)
        files["faces_grid"] = save_face_grid(
            images, labels, probs[tta], class_names, indices, os.path.join(out_dir, "faces_grid.png"),
            f"{split_name}: first {len(indices)} faces, {tta_name} (green right, red wrong)")
    result = {"tta": tta, "split": split_name, **metrics}
    if tta != "none":
        result["plain"] = results["none"][0]
    files["metrics"] = os.path.join(out_dir, "metrics.json")
    result.update(checkpoints=[os.path.abspath(getattr(m, "source", m.name)) for m in models],
                  models=[getattr(m, "name", type(m).__name__) for m in models],
                  class_names=list(class_names), classification_report=text, files=files)
    save_json(result, files["metrics"])
    log("wrote metrics.json, predictions.csv, confusion matrices"
        + (f", {len(indices)} faces and their grid" if indices else "") + f" to {out_dir}")
    return dict(result, folder=out_dir, probs=probs[tta], indices=indices)


def report_split(models, data, split, out_dir, tta="none", num_save=16, batch_size=None, device="cpu"):
    """report() on one split of a data set (dataset.FerData: a CSV or a folder; split 'all': every
    face), in the models' classes. Faces of classes the models do not have (a folder's contempt)
    are left out of the metrics and reported apart under classes_not_in_model, with what the
    models took them for; a folder's predictions.csv also names each face's file.

    Returns (report()'s result, the faces and labels reported: what explain.py maps)."""
    images, labels = data.split(split)
    names = predict.model_classes(models)
    mapped = to_model_classes(labels, data.class_names, names)
    known = mapped >= 0
    if not known.any():
        raise UserError(f"none of the classes of {printable(data.source)} ({', '.join(data.class_names)}) "
                        f"is one of the model's ({', '.join(names)})")
    split_name = split if data.files is not None else f"{split} ({SPLITS.get(split, 'every row')})"
    faces, apart = (images, None) if known.all() else (images[known], images[~known])
    result = report(models, faces, mapped[known], out_dir, tta, num_save, batch_size, device, split_name)
    if data.files is not None:  # which file is which face, and which files were left out
        folders.write_split(data, result["folder"])
        files = np.asarray(data.files, dtype=object)[data.mask(split)][known]
        for key in ("predictions", "predictions_plain"):
            if key in result["files"]:
                add_file_column(result["files"][key], [printable(f) for f in files])
    if apart is not None:
        probs = predict.predict(models, apart, tta, batch_size, device)
        result["classes_not_in_model"] = taken_for(labels[~known], probs, data.class_names, names)
        for name, seen in result["classes_not_in_model"].items():
            print(f"{name}: {seen['faces']} faces of a class the model does not have, left out of the "
                  "metrics; taken for " + ", ".join(f"{k} {v}" for k, v in seen["taken_for"].items()))
        save_json({k: v for k, v in result.items() if k not in ("folder", "probs", "indices")},
                  result["files"]["metrics"])
    return result, faces, mapped[known]


def to_model_classes(labels, class_names, model_names):
    """Labels (indices into `class_names`) renumbered as a model's classes (by name, any case);
    -1 for a class the model does not have."""
    index = {name.lower(): i for i, name in enumerate(model_names)}
    return np.array([index.get(name.lower(), -1) for name in class_names], np.int64)[labels]


def taken_for(labels, probs, class_names, model_names):
    """What a model took the faces of classes it does not have for: {class: {"faces": n,
    "taken_for": {its class: faces, most first}}}."""
    guesses = np.asarray(probs).argmax(1)
    return {class_names[label]: {"faces": int((labels == label).sum()), "taken_for": {
        model_names[k]: n for k, n in Counter(guesses[labels == label].tolist()).most_common()}}
        for label in np.unique(labels)}


def add_file_column(path, files):
    """A `file` column (each face's image) after the index of a predictions CSV."""
    import pandas as pd
    table = pd.read_csv(path, keep_default_na=False)
    table.insert(1, "file", files)
    text = table.to_csv(index=False, float_format="%.6f", lineterminator="\n")
    atomic_write(path, lambda f: f.write(text.encode()))
