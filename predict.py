"""Models in, probabilities out: load checkpoints, predict with test-time augmentation, and find
the faces and emotions of one picture. The one evaluation path: infer.py's reports, run.py's
validation (train.evaluate) and app.py all call `predict`.

    import predict
    models = predict.load_models()                       # the shipped default model
    predict.detect_emotions(models, "photo.jpg")         # [{"box": ..., "emotion": "Happy", ...}]
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import faces
import onnx_model
from utils import EMOTIONS, SIDE, UserError, eval_batch_size, to_unit_float

TTA_MODES = ("none", "flip", "tencrop")
# The best single model of the long runs (README "Results"), found beside this script.
DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained",
                                  "fer2013_vgg2_4_2_conv5.pth")
CROP = 44  # tencrop: crops of 44 x 44 pixels, resized back to 48 x 48


def autocast(device, amp_dtype):
    """torch.autocast on `device` in `amp_dtype` (utils.autocast_dtype), or a no-op for None."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def load_models(checkpoint_paths=DEFAULT_CHECKPOINT, device="cpu"):
    """Load one or more checkpoints (files, or run folders holding one *_best.pth; by default the
    shipped model) as models in eval mode; an .onnx file becomes an onnx_model.OnnxModel (onnxruntime on the CPU), which
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
    for model, path in zip(models, paths):
        model.source = path  # reports name the file each model came from
    model_classes(models)  # an ensemble must agree on its classes
    return models


def model_classes(models):
    """The class names of a model, or of the models of an ensemble (a UserError when they differ):
    FER2013's seven, or the classes of the folder a model was trained on (folders.py)."""
    models = [models] if isinstance(models, torch.nn.Module) else models
    names = list(dict.fromkeys(tuple(getattr(m, "class_names", EMOTIONS)) for m in models))
    if len(names) > 1:
        raise UserError("the models of an ensemble must have the same classes; these have "
                        + " / ".join(", ".join(n) for n in names))
    return names[0] if names else EMOTIONS


def require_emotions(models, what):
    """A UserError unless the models have FER2013's seven classes: photos, videos and the page
    name, colour and chart faces by those seven (a folder-trained model is for `infer.py -d`)."""
    if model_classes(models) != EMOTIONS:
        raise UserError(f"{what} need a model of FER2013's seven classes; this one has "
                        + ", ".join(model_classes(models)))


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
def predict_modes(models, images, modes, batch_size, device):
    """{tta mode: probabilities (N, classes) float64} for each mode, in one pass over the batches
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
        x = to_unit_float(x)
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
    """Class probabilities (N, classes) float64 for faces (N, 48, 48) (uint8, or float in [0, 1]).

    Batched, under torch.inference_mode(). Probabilities are averaged over `models` (a model or a
    list: an ensemble) and over the test-time augmentation views of `tta` (none, flip, tencrop)."""
    return predict_modes(models, images, (tta,), batch_size, device)[tta]


def detect_emotions(models, image, tta="none", detect=True, device="cpu", colours="bgr"):
    """The faces in one picture and their emotions, for use from Python (as fer's
    FER().detect_emotions or deepface's analyze). `models` from load_models (None: the shipped
    model, loaded once); `image` a photo's path, a PIL image, or a uint8 array: grey, or colour in
    the order `colours` names: "bgr" for OpenCV (cv2.imread, video frames; the default), "rgb" for
    PIL, matplotlib, imageio or scikit-image arrays. Returns one dict per face, {"box": (x, y, w,
    h) in the picture's pixels, "emotion": "Happy", "confidence": 0.93, "emotions": {"Angry": p,
    ...}}; `detect=False` takes the whole picture as one face."""
    import cv2
    if colours not in ("bgr", "rgb"):
        raise ValueError(f"colours must be 'bgr' or 'rgb', got {colours!r}")
    models = _default_models() if models is None else models
    factor = 1
    if isinstance(image, (str, os.PathLike)):
        try:
            image, factor, _ = faces.read_image(image)  # upright (EXIF), in OpenCV's BGR order
        except faces.Skipped as why:
            raise ValueError(f"{image} {why}") from None
        colours = "bgr"
    elif hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image: RGB whatever its mode
        image, colours = _pil_rgb(image), "rgb"
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"expected a grey or 3-channel uint8 picture, got a {image.dtype} array of shape {image.shape}")
    if image.ndim == 3 and colours == "rgb":
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    boxes, crops = faces.find_faces(image, faces.face_detector() if detect else faces.WholePicture())
    probs = predict(models, crops, tta, device=device) if boxes else []
    names = model_classes(models)
    return [{"box": tuple(int(v) * factor for v in box), "emotion": names[int(p.argmax())],
             "confidence": float(p.max()), "emotions": dict(zip(names, map(float, p)))}
            for box, p in zip(boxes, probs)]


_shipped = []  # the default model of detect_emotions, loaded on first use


def _pil_rgb(image):
    """A PIL image as an RGB uint8 array, read as a path is (faces.read_image): turned upright by
    its EXIF orientation, 16-bit grey scaled to 8 bits (PIL's convert would clip it to white)."""
    from PIL import ImageOps
    image = ImageOps.exif_transpose(image)
    if image.mode == "F":  # float grey, in [0, 1] or [0, 255]
        grey = np.asarray(image, np.float64)
        grey = grey * 255 if grey.max() <= 1 else grey
    elif image.mode.startswith("I"):  # 16- or 32-bit integer grey: 8 bits, as OpenCV reads a 16-bit file
        grey = np.asarray(image, np.float64) / 257
    else:
        return np.asarray(image.convert("RGB"))
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def _default_models():
    if not _shipped:
        _shipped.extend(load_models())
    return _shipped
