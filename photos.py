"""Faces in your own photos: find them (OpenCV's Haar cascade), classify them, annotate the photos.

`infer.py --images PATH [PATH ...]` calls classify_photos; the model comes in as a function from
faces (N, 48, 48) to probabilities (N, 7), so this module knows nothing about checkpoints.
"""
import contextlib
import math
import os
import sys

import numpy as np

from utils import EMOTIONS, SIDE, UserError, atomic_write, save_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAX_PIXELS = 50_000_000  # larger photos: JPEGs are decoded at 1/2, 1/4 or 1/8 scale, others refused
MAX_FILE_BYTES = 1 << 30
DETECT_SIDE = 1280  # faces are searched on a copy of the photo at most this many pixels across
FACE_MARGIN = 0.1  # the crop adds this fraction of the detected box on every side
SKIPPED_SHOWN = 10  # per folder, files that are not images named one by one


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


def find_images(paths):
    """Expand files and folders (recursively) into ([(path, output name)], [(path, reason, shown)]).

    Files named explicitly are tried whatever their extension; in folders only files with an
    image extension (any case) are taken. The second list holds what was passed over; `shown` is
    False for the files after the first few of a folder that are not images (they are counted,
    not named one by one)."""
    found, skipped, seen = [], [], set()
    for given in map(os.fspath, paths):
        if not os.path.exists(given):
            skipped.append((given, "does not exist (no such file or folder)", True))
        elif not os.path.isdir(given):
            if os.path.realpath(given) not in seen:
                seen.add(os.path.realpath(given))
                found.append((given, os.path.basename(given)))
        else:
            root = os.path.basename(os.path.normpath(os.path.abspath(given))) or "root"
            others = []
            walk = os.walk(given, onerror=lambda err: skipped.append(
                (err.filename, f"is a folder that cannot be read ({err.strerror or err})", True)))
            for folder, dirs, files in walk:
                dirs.sort()
                for file in sorted(files):
                    path = os.path.join(folder, file)
                    if not file.lower().endswith(IMAGE_EXTENSIONS):
                        others.append(path)
                    elif os.path.realpath(path) not in seen:
                        seen.add(os.path.realpath(path))
                        found.append((path, os.path.join(root, os.path.relpath(path, given))))
            kinds = ", ".join(e[1:] for e in IMAGE_EXTENSIONS)
            skipped += [(path, f"is not an image file ({kinds})", k < SKIPPED_SHOWN)
                        for k, path in enumerate(others)]
    return found, skipped


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


def write_image(path, image):
    import cv2
    ext = os.path.splitext(path)[1].lower()
    ok, buf = cv2.imencode(ext if ext in IMAGE_EXTENSIONS else ".png", image)
    if not ok:
        raise OSError(f"could not encode {path}")
    atomic_write(path, lambda f: f.write(buf.tobytes()))


def unique_name(name, used):
    """`name` with an image extension, numbered (_2, _3, ...) if `used` already has it."""
    stem, ext = os.path.splitext(name)
    ext = ext.lower() if ext.lower() in IMAGE_EXTENSIONS else ".png"
    candidate, k = stem + ext, 1
    while candidate.lower() in used:
        k += 1
        candidate = f"{stem}_{k}{ext}"
    used.add(candidate.lower())
    return candidate


def photo_rows(path, boxes, probs, factor, class_names, annotated):
    """faces.csv rows of one photo: one per face (box in the file's own pixels), or one 'no face'."""
    if not boxes:
        return [{"file": path, "face": None, "x": None, "y": None, "w": None, "h": None,
                 "emotion": "no face", "confidence": None,
                 **{f"p_{n}": None for n in class_names}, "annotated": annotated}]
    rows = []
    for j, (box, p) in enumerate(zip(boxes, probs)):
        best = int(p.argmax())
        x, y, w, h = (int(v) * factor for v in box)
        rows.append({"file": path, "face": j, "x": x, "y": y, "w": w, "h": h,
                     "emotion": class_names[best], "confidence": float(p[best]),
                     **{f"p_{n}": float(v) for n, v in zip(class_names, p)}, "annotated": annotated})
    return rows


def write_faces_table(rows, class_names, out_dir):
    """faces.csv (one row per face or face-less photo) and the same as faces.json entries."""
    import pandas as pd
    columns = ["file", "face", "x", "y", "w", "h", "emotion", "confidence",
               *[f"p_{n}" for n in class_names], "annotated"]
    table = pd.DataFrame(rows, columns=columns)
    for col in ("face", "x", "y", "w", "h"):
        table[col] = table[col].astype("Int64")
    csv_text = table.to_csv(index=False, float_format="%.6f", lineterminator="\n")
    atomic_write(os.path.join(out_dir, "faces.csv"), lambda f: f.write(csv_text.encode()))
    return [{"file": r["file"], "face": r["face"],
             "box": None if r["x"] is None else [r["x"], r["y"], r["w"], r["h"]],
             "emotion": r["emotion"], "confidence": r["confidence"],
             "probabilities": None if r["x"] is None else {n: r[f"p_{n}"] for n in class_names},
             "annotated": r["annotated"]} for r in rows]


def warn(message):
    from tqdm import tqdm
    tqdm.write(f"warning: {message}", file=sys.stderr)


def classify_photos(inputs, predict_faces, out_dir, detect=True, log=print, on_faces=None):
    """Find, crop and classify the faces in photos (files or folders), one photo at a time; write
    annotated copies under out_dir/annotated/ and faces.csv / faces.json (boxes x, y, w, h in the
    pixels of the file; a photo without a face gets one row with emotion 'no face'). Unusable
    inputs are named in a warning and skipped.

    `predict_faces(faces)` maps uint8 faces (N, 48, 48) to probabilities (N, 7).
    `on_faces(annotated_path, faces, probs)`, when given, also receives each photo's crops (for
    infer.py --explain).
    Returns {"processed": n, "skipped": [{file, reason}], "faces": [...], csv, json, ...};
    raises UserError when not a single image could be processed."""
    import cv2
    from tqdm import tqdm
    class_names = EMOTIONS
    entries, passed_over = find_images(inputs)
    skipped = []
    for path, reason, shown in passed_over:
        if shown:
            warn(f"{path} {reason}; skipped")
        skipped.append({"file": path, "reason": reason})
    hidden = sum(not shown for _, _, shown in passed_over)
    if hidden:
        warn(f"{hidden} more files that are not images; skipped")
    cascade = face_detector() if detect else None
    annotated_dir = os.path.join(out_dir, "annotated")
    used_names, rows, processed = set(), [], 0
    for path, name in tqdm(entries, desc="photos", unit="image", disable=len(entries) < 2,
                           file=sys.stderr, dynamic_ncols=True):
        try:
            image, factor, note = read_image(path)
        except Skipped as why:
            warn(f"{path} {why}; skipped")
            skipped.append({"file": path, "reason": str(why)})
            continue
        if note:
            warn(f"{path} {note}")
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        boxes = detect_faces(cascade, grey) if detect else [(0, 0, grey.shape[1], grey.shape[0])]
        crops = [crop_face(grey, box, FACE_MARGIN if detect else 0.0) for box in boxes]
        probs = predict_faces(np.stack(crops)) if crops else []
        target = os.path.join(annotated_dir, unique_name(name, used_names))
        if on_faces is not None and crops:
            on_faces(target, np.stack(crops), probs)
        rows += photo_rows(path, boxes, probs, factor, class_names, target)
        labels = [(box, class_names[int(p.argmax())], float(p.max())) for box, p in zip(boxes, probs)]
        try:
            write_image(target, annotate(image, labels))
        except OSError as err:
            warn(f"{target}: could not write the annotated copy ({err})")
        processed += 1
    if processed == 0:
        what = f"none of the {len(entries)} image files" if entries else "no image files were found"
        raise UserError(f"nothing could be processed: {what}"
                        f"{' could be read' if entries else ''} in {', '.join(map(str, inputs))}")

    faces = write_faces_table(rows, class_names, out_dir)
    result = {"processed": processed, "skipped": skipped, "detect": detect,
              "class_names": list(class_names), "faces": faces}
    save_json(result, os.path.join(out_dir, "faces.json"))
    found = [r for r in rows if r["x"] is not None]
    no_face = len(rows) - len(found)
    log(f"{processed} image(s) processed: {len(found)} face(s), {no_face} image(s) without a face, "
        f"{len(skipped)} input(s) skipped")
    if found:
        counts = {n: sum(r["emotion"] == n for r in found) for n in class_names}
        log("  " + ", ".join(f"{n} {c}" for n, c in counts.items() if c))
    if no_face and detect:
        log("  (no face found: if those images are already-cropped faces, pass --no-detect)")
    log(f"wrote faces.csv, faces.json and annotated copies to {out_dir}")
    return dict(result, csv=os.path.join(out_dir, "faces.csv"),
                json=os.path.join(out_dir, "faces.json"), annotated_dir=annotated_dir)
