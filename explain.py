"""Grad-CAM: where in a face a model found the evidence for a class.

    python3 infer.py -c pretrained/fer2013_vgg2_4_2_conv5.pth -d synthetic --explain
    python3 infer.py -c pretrained/fer2013_vgg2_4_2_conv5.pth --images me.jpg --explain_class Sad

Grad-CAM (Selvaraju et al., 2017) weighs each channel of a convolutional layer's output by the
mean gradient of the class's logit over that channel, sums the weighted channels, keeps the
positive part (what speaks for the class, not against it), upsamples the result bilinearly to the
face's size and scales it to peak at 1. The layer is the model's last convolutional block, named
per model in models.CAM_LAYER: late enough to see whole expressions, still a spatial map
(6x6 to 24x24 cells for 48x48 faces).

An ensemble is explained by the average of its members' maps, each member explaining the same
class (the ensemble's prediction, or the one asked for).
"""
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from models import CAM_LAYER
from utils import EMOTIONS, UserError, atomic_write, save_figure, to_unit_float


def cam_layer(model):
    """The module whose output Grad-CAM reads: models.CAM_LAYER[model.name]."""
    name = getattr(model, "name", None)
    if name not in CAM_LAYER:
        raise UserError(f"Grad-CAM needs a PyTorch model of this tool; got {name or type(model).__name__}"
                        " (ONNX files have no gradients: pass the .pth checkpoint to --explain)")
    return model.get_submodule(CAM_LAYER[name])


def _peak_to_one(maps):
    """Each map divided by its maximum (maps that are zero everywhere stay zero)."""
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, maps / peak.clamp_min(1e-12), torch.zeros_like(maps))


def grad_cam(model, faces, classes, layer=None, batch_size=64, device="cpu"):
    """Grad-CAM maps (N, H, W) float32 in [0, 1] for faces (N, H, W) (uint8, or float in [0, 1]),
    one class index per face in `classes`.

    `layer` defaults to cam_layer(model). The model runs in eval mode and fp32 (autocast off):
    gradients in bf16 would make the small channel weights noisy."""
    layer = cam_layer(model) if layer is None else layer
    faces = torch.as_tensor(np.asarray(faces))
    classes = torch.as_tensor(np.asarray(classes), dtype=torch.long).reshape(-1)
    if len(classes) != len(faces):
        raise ValueError(f"{len(faces)} faces but {len(classes)} classes")
    device = torch.device(device)
    model.eval()
    captured = []
    hook = layer.register_forward_hook(lambda module, args, out: captured.append(out))
    maps = []
    try:
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device.type, enabled=False):
            for start in range(0, len(faces), batch_size):
                x = faces[start:start + batch_size].to(device).unsqueeze(1)
                x = to_unit_float(x)
                x.requires_grad_(True)  # gradients reach the layer even when weights are frozen
                captured.clear()
                logits = model(x)
                activation = captured[-1]
                cls = classes[start:start + batch_size].to(device)
                # Faces do not interact in eval mode, so the gradient of the sum is each face's own.
                score = logits.gather(1, cls[:, None]).sum()
                grad, = torch.autograd.grad(score, activation)
                weights = grad.mean(dim=(2, 3), keepdim=True)
                cam = F.relu((weights * activation).sum(1, keepdim=True))
                cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
                maps.append(_peak_to_one(cam[:, 0]).detach().float().cpu())
    finally:
        hook.remove()
    if not maps:
        return np.zeros((0, *faces.shape[1:]), np.float32)
    return torch.cat(maps).numpy()


def explain_faces(models, faces, classes, batch_size=64, device="cpu"):
    """Grad-CAM maps (N, H, W) in [0, 1] of `classes` for a model or an ensemble: a list of
    models is explained by the average of their maps, scaled again to peak at 1."""
    if isinstance(models, torch.nn.Module):
        models = [models]
    for model in models:
        cam_layer(model)  # every member must be explainable before any work
    maps = sum(grad_cam(m, faces, classes, batch_size=batch_size, device=device) for m in models)
    return _peak_to_one(torch.from_numpy(maps / len(models))).numpy()


# ----------------------------------------------------------------------------- pictures

def overlay(face, cam, alpha=0.45):
    """A BGR uint8 image of the grey face with the map over it (OpenCV's JET colours: red is
    where the evidence is), at the face's size."""
    import cv2
    heat = cv2.applyColorMap(np.uint8(np.round(np.clip(cam, 0, 1) * 255)), cv2.COLORMAP_JET)
    grey = cv2.cvtColor(np.ascontiguousarray(face, np.uint8), cv2.COLOR_GRAY2BGR)
    return cv2.addWeighted(heat, alpha, grey, 1 - alpha, 0)


def save_cam_images(faces, cams, paths):
    """Each face's overlay as a PNG at `paths` (folders are made); returns the paths."""
    import cv2
    for face, cam, path in zip(faces, cams, paths):
        ok, buf = cv2.imencode(".png", overlay(face, cam))
        if not ok:
            raise OSError(f"could not encode {path}")
        atomic_write(path, lambda f: f.write(buf.tobytes()))
    return list(paths)


def save_explain_grid(faces, cams, titles, path, title, colors=None, per_row=4):
    """One image: each face beside its map (overlaid), the face titled with `titles[i]`
    (in `colors[i]`), the map with the class it explains. Returns the path."""
    from matplotlib.figure import Figure
    k = len(faces)
    cols = min(per_row, k)
    rows = math.ceil(k / cols)
    fig = Figure(figsize=(max(6.4, 3.2 * cols), 2.1 * rows + 0.6))
    axes = fig.subplots(rows, 2 * cols, squeeze=False)
    for ax in axes.reshape(-1):
        ax.axis("off")
    for i in range(k):
        face_ax, cam_ax = axes[i // cols, 2 * (i % cols)], axes[i // cols, 2 * (i % cols) + 1]
        face_ax.imshow(faces[i], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        face_ax.set_title(titles[i][0], fontsize=7, color=(colors[i] if colors else "black"))
        cam_ax.imshow(faces[i], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        cam_ax.imshow(cams[i], cmap="jet", vmin=0, vmax=1, alpha=0.45, interpolation="bilinear")
        cam_ax.set_title(titles[i][1], fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def cam_path(face_path):
    """faces/Happy_3.png -> faces/Happy_3_cam.png: the map is saved beside the face."""
    stem, _ = os.path.splitext(face_path)
    return f"{stem}_cam.png"


# ----------------------------------------------------------------------------- maps of reports, photos and videos

def explained_classes(probs, explain_class=None):
    """The class each face's map explains: the predicted one, or `explain_class` for all."""
    probs = np.asarray(probs)
    if explain_class is None:
        return probs.argmax(1)
    return np.full(len(probs), int(explain_class))


def _cam_note(models):
    return "" if len(models) == 1 else f", average of the {len(models)} members' maps"


def explain_saved_faces(models, result, images, labels, explain_class=None, batch_size=None, device="cpu"):
    """Grad-CAM maps of the faces a split report saved (`result` from report.report): <face>_cam.png
    beside each face file, and explain_grid.png, the faces beside their maps. Returns (map paths,
    grid path)."""
    indices, probs, names = result["indices"], result["probs"], result["class_names"]
    if not indices:
        return [], None
    explain_class = in_classes(explain_class, names)
    faces = np.asarray(images)[indices]
    classes = explained_classes(probs[indices], explain_class)
    cams = explain_faces(models, faces, classes, batch_size or 64, device)
    paths = save_cam_images(faces, cams, [cam_path(p) for p in result["files"]["faces"]])
    titles, colors = [], []
    for i, c in zip(indices, classes):
        p = int(np.argmax(probs[i]))
        titles.append((f"#{i} true {names[labels[i]]}\npred {names[p]} {probs[i][p]:.0%}",
                       f"Grad-CAM: {names[c]}\n{probs[i][c]:.0%}"))
        colors.append("#1a7f37" if p == int(labels[i]) else "#cf222e")
    what = "predicted class" if explain_class is None else names[explain_class]
    grid = save_explain_grid(faces, cams, titles, os.path.join(result["folder"], "explain_grid.png"),
                             f"{result['split']}: Grad-CAM of the {what}{_cam_note(models)}", colors)
    return paths, grid


def in_classes(explain_class, names):
    """--explain_class (an index into FER2013's EMOTIONS) as an index into a model's classes
    `names` (a model of a folder may have others, in another order); None stays None."""
    if explain_class is None or tuple(names) == EMOTIONS:
        return explain_class
    if EMOTIONS[explain_class] not in names:
        raise UserError(f"--explain_class {EMOTIONS[explain_class]}: the model has no such class "
                        f"(its classes: {', '.join(names)})")
    return list(names).index(EMOTIONS[explain_class])


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
    cams = explain_faces(models, faces, classes, batch_size or 64, device)
    for face, stem in zip(faces, stems):  # the crop the map belongs to, as the model saw it
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(face))
        if not ok:
            raise OSError(f"could not encode {stem}.png as PNG")
        atomic_write(f"{stem}.png", lambda f: f.write(buf.tobytes()))
    paths = save_cam_images(faces, cams, [f"{stem}_cam.png" for stem in stems])
    k = min(grid_faces, len(faces))
    titles = []
    for stem, p, c in zip(stems[:k], probs[:k], classes[:k]):
        name = os.path.relpath(stem, os.path.join(out_dir, "cams"))
        titles.append((f"{name[-24:]}\n{EMOTIONS[int(p.argmax())]} {p.max():.0%}",
                       f"Grad-CAM: {EMOTIONS[c]}\n{p[c]:.0%}"))
    what = "predicted class" if explain_class is None else EMOTIONS[explain_class]
    shown = "" if k == len(faces) else f" (first {k} of {len(faces)} faces)"
    grid = save_explain_grid(faces[:k], cams[:k], titles,
                                     os.path.join(out_dir, "explain_grid.png"),
                                     f"Grad-CAM of the {what}{_cam_note(models)}{shown}")
    return paths, grid


def report_maps(cams, grid, out_dir):
    print(f"wrote {len(cams)} Grad-CAM map(s) to {os.path.join(out_dir, 'cams')}"
          + (" and explain_grid.png" if grid else ""))
