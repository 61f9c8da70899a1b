"""Faces in your own photos: find them (OpenCV's Haar cascade), classify them, annotate the photos.

`infer.py --images PATH [PATH ...]` calls classify_photos; the model comes in as a function from
faces (N, 48, 48) to probabilities (N, 7), so this module knows nothing about checkpoints.
"""
import contextlib
import math
import os
import sys
import threading

import numpy as np

from utils import EMOTIONS, SIDE, UserError, atomic_write, save_figure, save_json

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # annotated copies keep these, else .png
# Everything OpenCV's imread decodes (its documentation's list); in folders these files are taken.
READ_EXTENSIONS = IMAGE_EXTENSIONS + (".jpe", ".dib", ".jp2", ".avif", ".tif", ".tiff", ".gif",
                                      ".pbm", ".pgm", ".ppm", ".pxm", ".pnm", ".pfm", ".sr", ".ras",
                                      ".exr", ".hdr", ".pic")
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
        if cv2.haveImageReader(os.fspath(path)):  # a format only OpenCV reads (e.g. HDR, PFM):
            return _read_with_opencv(path, max_pixels)  # no header check, OpenCV's own cap
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


def _read_with_opencv(path, max_pixels):
    """Decode a file PIL cannot identify with OpenCV alone; its size is known only afterwards (OpenCV
    refuses more than 2**30 pixels itself)."""
    import cv2
    image = cv2.imread(os.fspath(path), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise Skipped("could not be decoded (corrupt or truncated?)")
    h, w = image.shape[:2]
    if w * h > max_pixels:
        raise Skipped(f"is {w}x{h} pixels, above the limit of {max_pixels / 1e6:g} megapixels; refused")
    return image, 1, None


# Files that only the output folders of infer.py and run.py hold (photos, a video, a split, a run).
OUTPUT_MARKERS = ("faces.json", "frames.csv", "metrics.json", "history.json")
EARLIER_OUTPUT = "holds the results of an earlier call, not searched (name it to search it)"


def walk_inputs(top, passed_over, onerror=None):
    """(folder, sorted file names) of `top` and its subfolders, like os.walk, passing over the
    subfolders that hold the results of earlier calls (OUTPUT_MARKERS): `--images .` must not
    take earlier annotated copies for new photos. Those are added to `passed_over`."""
    for folder, dirs, files in os.walk(top, onerror=onerror):
        earlier = {d for d in dirs if any(os.path.isfile(os.path.join(folder, d, marker))
                                          for marker in OUTPUT_MARKERS)}
        passed_over += [os.path.join(folder, d) for d in sorted(earlier)]
        dirs[:] = sorted(set(dirs) - earlier)
        yield folder, sorted(files)


def find_images(paths):
    """Expand files and folders (recursively) into ([(path, output name)], [(path, reason, shown)]).

    Files named explicitly are tried whatever their extension; in folders the files with an
    extension OpenCV decodes (READ_EXTENSIONS, any case) are taken. The second list holds what
    was passed over; `shown` is
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
            others, earlier = [], []
            walk = walk_inputs(given, earlier, onerror=lambda err: skipped.append(
                (err.filename, f"is a folder that cannot be read ({err.strerror or err})", True)))
            for folder, files in walk:
                for file in files:
                    path = os.path.join(folder, file)
                    if not file.lower().endswith(READ_EXTENSIONS):
                        others.append(path)
                    elif os.path.realpath(path) not in seen:
                        seen.add(os.path.realpath(path))
                        found.append((path, os.path.join(root, os.path.relpath(path, given))))
            skipped += [(path, "is not an image file (no image extension OpenCV reads)", k < SKIPPED_SHOWN)
                        for k, path in enumerate(others)]
            skipped += [(path, EARLIER_OUTPUT, True) for path in earlier]
    return found, skipped


_loaded = threading.local()  # one face detector per thread: a CascadeClassifier is not shared


def face_detector():
    """OpenCV's frontal-face Haar cascade, shipped inside opencv-python(-headless) 4; loaded once
    per thread (a load takes ~80 ms: infer.detect_emotions may be called for every frame)."""
    if getattr(_loaded, "cascade", None) is None:
        _loaded.cascade = _load_face_detector()
    return _loaded.cascade


def _load_face_detector():
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


def detect_faces(cascade, grey, side=DETECT_SIDE):
    """Face boxes [(x, y, w, h)] in a grey image, left to right. The search runs on a copy at
    most `side` pixels across (fast on big photos); boxes are in the full image's pixels."""
    import cv2
    h, w = grey.shape
    scale = min(1.0, side / max(h, w))
    small = grey if scale == 1.0 else cv2.resize(
        grey, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    found = cascade.detectMultiScale(small, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
    boxes = []
    for x, y, bw, bh in (found if len(found) else []):
        x0, y0 = int(round(x / scale)), int(round(y / scale))
        x1, y1 = min(w, int(round((x + bw) / scale))), min(h, int(round((y + bh) / scale)))
        boxes.append((x0, y0, x1 - x0, y1 - y0))
    return sorted(boxes)


def faces_in_image(image, predict_faces, cascade=None):
    """(boxes, 48x48 crops, probabilities) of one picture, a BGR or grey uint8 array: the faces
    `cascade` finds in it, or with no cascade the whole picture as one face (already cropped)."""
    import cv2
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if cascade is None:
        boxes = [(0, 0, grey.shape[1], grey.shape[0])]
    else:
        boxes = detect_faces(cascade, grey)
    if not boxes:
        return [], np.zeros((0, SIDE, SIDE), np.uint8), np.zeros((0, len(EMOTIONS)))
    crops = np.stack([crop_face(grey, box, FACE_MARGIN if cascade is not None else 0.0) for box in boxes])
    return boxes, crops, predict_faces(crops)


def crop_face(grey, box, margin=FACE_MARGIN):
    """The face in `box` plus `margin` of its size on each side, as 48x48. Where the margin runs
    past the picture's edge, the edge pixels are repeated: the crop keeps the face's proportions
    instead of being stretched to a square."""
    import cv2
    x, y, w, h = box
    extra = margin * max(w, h)
    height, width = grey.shape
    x0, y0 = int(round(x - extra)), int(round(y - extra))
    x1, y1 = int(round(x + w + extra)), int(round(y + h + extra))
    crop = cv2.copyMakeBorder(grey[max(0, y0):min(height, y1), max(0, x0):min(width, x1)],
                              max(0, -y0), max(0, y1 - height), max(0, -x0), max(0, x1 - width),
                              cv2.BORDER_REPLICATE)
    shrink = crop.shape[0] > SIDE or crop.shape[1] > SIDE
    return cv2.resize(crop, (SIDE, SIDE), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


# One colour per emotion (BGR), for boxes, labels, the legend, the video and the timeline.
EMOTION_COLOURS = {"Angry": (40, 40, 220), "Disgust": (40, 150, 40), "Fear": (170, 60, 150),
                   "Happy": (0, 210, 255), "Sad": (200, 120, 30), "Surprise": (0, 140, 255),
                   "Neutral": (170, 170, 170)}
FONT_SCALE_MIN = 0.35  # labels are shrunk down to this to fit their box's width, then shortened


def text_colour(bgr):
    """Black on light colours, white on dark ones."""
    b, g, r = bgr
    return (0, 0, 0) if 0.114 * b + 0.587 * g + 0.299 * r > 140 else (255, 255, 255)


def fit_label(texts, width, scale, thick):
    """The first of `texts` (longest first) and the font scale at which it fits in `width` pixels,
    shrinking the scale down to FONT_SCALE_MIN; None when none fits (a box a few pixels wide).
    Returns (text, scale, label width, label height, baseline)."""
    import cv2
    font = cv2.FONT_HERSHEY_SIMPLEX
    for text in texts:
        (tw, th), base = cv2.getTextSize(text, font, scale, thick)
        fitted = min(scale, scale * (width - 4) / max(tw, 1))
        if fitted >= FONT_SCALE_MIN:
            (tw, th), base = cv2.getTextSize(text, font, fitted, thick)
            return text, fitted, tw + 4, th + base + 4, base
    return None


def place_labels(boxes, sizes, height):
    """The top edge of each face's label, or None where no place is free.

    A label spans its box's left edge to its own width (never wider than the box, see fit_label),
    so it stays in its face's column. Faces are taken top to bottom; each label goes to the free
    position nearest to just above its box or just below it (ties: above), inside the image and
    clear of every label placed before. The best position is one of those two, an image edge, or
    touching a label already placed, so only those are tried."""
    tops = [None] * len(boxes)
    placed = []  # (left, right, top, bottom) of the labels placed so far
    for i in sorted(range(len(boxes)), key=lambda i: (boxes[i][1], boxes[i][0])):
        if sizes[i] is None:
            continue
        (x, y, _, h), (lw, lh) = boxes[i], sizes[i]
        blockers = [(t, b) for left, right, t, b in placed if left < x + lw and x < right]
        wanted = (y - lh, y + h)
        candidates = {*wanted, y, 0, height - lh, *(b for _, b in blockers),
                      *(t - lh for t, _ in blockers)}
        free = [t for t in candidates if 0 <= t <= height - lh
                and all(t + lh <= bt or t >= bb for bt, bb in blockers)]
        if free:
            tops[i] = min(free, key=lambda t: (min(abs(t - wanted[0]), abs(t - wanted[1])),
                                               abs(t - wanted[0])))
            placed.append((x, x + lw, tops[i], tops[i] + lh))
    return tops


def draw_legend(image, boxes):
    """The seven emotions and their colours in the corner that covers the fewest faces
    (bottom right when it makes no difference)."""
    import cv2
    height, width = image.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = max(0.35, min(height, width) / 1400)
    thick = 1
    (tw, th), base = cv2.getTextSize("Surprise", font, scale, thick)
    row = th + base + 4
    lw, lh = tw + th + 14, row * len(EMOTIONS) + 4
    if lw >= width or lh >= height:
        return image  # a thumbnail: no room for a legend

    def covered(corner):
        left, top = corner
        return sum(max(0, min(left + lw, x + w) - max(left, x)) * max(0, min(top + lh, y + h) - max(top, y))
                   for x, y, w, h in boxes)
    corners = [(width - lw, height - lh), (0, height - lh), (width - lw, 0), (0, 0)]
    left, top = min(corners, key=covered)  # min keeps the first of equals: bottom right
    cv2.rectangle(image, (left, top), (left + lw - 1, top + lh - 1), (40, 40, 40), -1)
    for k, name in enumerate(EMOTIONS):
        y = top + 4 + k * row
        cv2.rectangle(image, (left + 4, y + 1), (left + 4 + th, y + 1 + th), EMOTION_COLOURS[name], -1)
        cv2.putText(image, name, (left + th + 10, y + th + 1), font, scale, (255, 255, 255), thick,
                    cv2.LINE_AA)
    return image


def annotate(image, faces, legend=True):
    """Draw each face [(box, emotion, confidence) or (box, emotion, confidence, track id)] on a BGR
    image in place: a box in the emotion's colour and a label '#id Emotion 87%' in the same colour
    (see place_labels: labels never overlap and stay above, below or inside their own box's
    column), plus a colour legend; an image without faces gets a 'no face found' note."""
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
    boxes, labels = [], []
    for box, emotion, confidence, *track in faces:
        x, y, w, h = (int(v) for v in box)
        thick = max(1, round(max(w, h) / 100))
        tag = f"#{track[0]} " if track else ""
        texts = (f"{tag}{emotion} {confidence:.0%}", f"{tag}{emotion}", f"{tag}{emotion[:3]}",
                 emotion, emotion[:3])  # the first that fits the box's width
        boxes.append((x, y, w, h))
        labels.append((emotion, thick, fit_label(texts, w, max(0.4, min(3.0, w / 160)),
                                                 max(1, thick // 2))))
    if legend:
        draw_legend(image, boxes)
    tops = place_labels(boxes, [None if fit is None else fit[2:4] for _, _, fit in labels], height)
    for (x, y, w, h), (emotion, thick, _) in zip(boxes, labels):  # all boxes under all labels
        cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1),
                      EMOTION_COLOURS.get(emotion, (0, 200, 0)), thick)
    for (x, y, w, h), (emotion, thick, fit), top in zip(boxes, labels, tops):
        if top is None:
            continue
        colour = EMOTION_COLOURS.get(emotion, (0, 200, 0))
        text, scale, lw, lh, base = fit
        cv2.rectangle(image, (x, top), (x + lw - 1, top + lh - 1), colour, -1)
        cv2.putText(image, text, (x + 2, top + lh - base - 2), font, scale, text_colour(colour),
                    max(1, thick // 2), cv2.LINE_AA)
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
        boxes, crops, probs = faces_in_image(image, predict_faces, cascade)
        target = os.path.join(annotated_dir, unique_name(name, used_names))
        if on_faces is not None and boxes:
            on_faces(target, crops, probs)
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


# ----------------------------------------------------------------------------- video

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv",
                    ".flv", ".3gp", ".ts", ".mts", ".m2ts", ".ogv")
VIDEO_DETECT_SIDE = 400  # video frames are searched for faces on a copy this wide (640x480: 0.625x)
DETECT_EVERY = 3  # detect on every 3rd analysed frame; the tracker carries the boxes in between
SMOOTH_FRAMES = 5  # the annotation's label: the mean probabilities of a track's last 5 frames
MAX_MISSED = 5  # a track not re-detected in this many detection rounds ends
TIMELINE_TRACKS = 8  # the timeline shows at most this many tracks (the longest ones)
VIDEO_FILES = ("frames.csv", "annotated.mp4", "timeline.png", "summary.json")


def frame_columns():
    return ["video", "frame", "time_s", "track", "x", "y", "w", "h", "emotion", "confidence",
            *[f"p_{n}" for n in EMOTIONS]]


def find_videos(paths):
    """Expand inputs into ([(source, output name)], [(path, reason)]): a whole number that is not
    an existing file is a camera index; files are tried whatever their extension; folders give
    their files with a video extension (recursively)."""
    found, skipped, seen = [], [], set()
    for given in map(os.fspath, paths):
        if given.isdigit() and not os.path.exists(given):
            found.append((int(given), f"camera{given}"))
        elif not os.path.exists(given):
            skipped.append((given, "does not exist (no such file or folder)"))
        elif not os.path.isdir(given):
            found.append((given, os.path.splitext(os.path.basename(given))[0]))
        else:
            before, earlier = len(found), []
            for folder, files in walk_inputs(given, earlier):
                found += [(os.path.join(folder, f), os.path.splitext(f)[0]) for f in files
                          if f.lower().endswith(VIDEO_EXTENSIONS)]
            skipped += [(path, EARLIER_OUTPUT) for path in earlier]
            if len(found) == before:
                skipped.append((given, "is a folder without video files ("
                                + ", ".join(e[1:] for e in VIDEO_EXTENSIONS[:6]) + ", ...)"))
    unique = []
    for source, name in found:
        key = source if isinstance(source, int) else os.path.realpath(source)
        if key not in seen:
            seen.add(key)
            unique.append((source, name))
    return unique, skipped


def open_video(source):
    """cv2.VideoCapture of a file or a camera index, and (fps, announced frame count or 0).
    Raises Skipped with the reason when it cannot be opened or holds no frame."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's and OpenCV's warnings off:
    import cv2  # the reason is said here in one line (read once, before the first video is opened)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    camera = isinstance(source, int)
    if not camera:
        try:
            if os.path.getsize(source) == 0:
                raise Skipped("is an empty (zero-byte) file")
        except OSError as err:
            raise Skipped(f"cannot be read ({err.strerror or err})") from err
        cap = cv2.VideoCapture(source, cv2.CAP_FFMPEG)
    else:
        cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        cap.release()
        raise Skipped("is not a camera that can be opened (no camera with that index?)" if camera
                      else "could not be opened as a video (not a video file, or corrupt or "
                           "truncated: an MP4 cut short loses its index)")
    fps = cap.get(cv2.CAP_PROP_FPS)
    fps = fps if 0 < fps < 1000 else 30.0
    count = 0 if camera else max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT)))
    return cap, fps, count


def iou(a, b):
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    inter = max(0, min(ax + aw, bx + bw) - max(ax, bx)) * max(0, min(ay + ah, by + bh) - max(ay, by))
    return inter / (aw * ah + bw * bh - inter) if inter else 0.0


class Tracker:
    """Gives each face a track id that it keeps from frame to frame.

    A detection continues the track whose box (moved on by its speed) it overlaps most (IoU at
    least 0.3), or whose centre is within 3/4 of a face of its own; matches are taken best first,
    one detection per track. A track not re-detected in MAX_MISSED detection rounds ends, so a
    face that leaves and comes back may get a new id. Between detections, `carry` moves the boxes
    of the tracks seen at the last detection at their speed. Each track also keeps its last
    `window` probabilities for a steady label (`smoothed`)."""

    def __init__(self, window=SMOOTH_FRAMES):
        self.tracks = {}  # id -> {"box", "frame", "speed" (dx, dy, dw, dh per frame), "missed", "probs"}
        self.next_id, self.window = 1, window

    def _at(self, track, frame):
        step = frame - track["frame"]
        return tuple(v + s * step for v, s in zip(track["box"], track["speed"]))

    def update(self, boxes, frame):
        """Match the detections of `frame` (an increasing number) to tracks; their ids in order."""
        from collections import deque
        pairs = []
        for tid, track in self.tracks.items():
            tx, ty, tw, th = self._at(track, frame)
            for j, (x, y, w, h) in enumerate(boxes):
                overlap = iou((tx, ty, tw, th), (x, y, w, h))
                dist = math.hypot(tx + tw / 2 - x - w / 2, ty + th / 2 - y - h / 2)
                if overlap >= 0.3 or dist <= 0.75 * max(tw, w):
                    pairs.append((-overlap, dist, tid, j))
        ids, taken = [None] * len(boxes), set()
        for _, _, tid, j in sorted(pairs):
            if ids[j] is None and tid not in taken:
                ids[j] = tid
                taken.add(tid)
        for j, box in enumerate(boxes):
            if ids[j] is None:
                ids[j], self.next_id = self.next_id, self.next_id + 1
                self.tracks[ids[j]] = {"box": box, "frame": frame, "speed": (0, 0, 0, 0), "missed": 0,
                                       "probs": deque(maxlen=self.window)}
            else:
                track = self.tracks[ids[j]]
                step = max(1, frame - track["frame"])
                track["speed"] = tuple((new - old) / step for new, old in zip(box, track["box"]))
                track.update(box=box, frame=frame, missed=0)
        for tid in [t for t in self.tracks if t not in taken and self.tracks[t]["frame"] != frame]:
            self.tracks[tid]["missed"] += 1
            if self.tracks[tid]["missed"] >= MAX_MISSED:
                del self.tracks[tid]
        return ids

    def carry(self, frame, width, height):
        """(ids, boxes) of the tracks detected at the last detection, moved on to `frame`
        (clipped to the image; boxes that left it are dropped)."""
        ids, boxes = [], []
        for tid, track in self.tracks.items():
            if track["missed"]:
                continue
            x, y, w, h = self._at(track, frame)
            x0, y0 = max(0, round(x)), max(0, round(y))
            x1, y1 = min(width, round(x + w)), min(height, round(y + h))
            if x1 - x0 >= 8 and y1 - y0 >= 8:
                ids.append(tid)
                boxes.append((x0, y0, x1 - x0, y1 - y0))
        return ids, boxes

    def smoothed(self, tid, probs):
        """Add a track's probabilities; the mean over its last `window` frames."""
        history = self.tracks[tid]["probs"]
        history.append(probs)
        return np.mean(history, axis=0)


def face_boxes(tracker, cascade, grey, frame, detect_every=DETECT_EVERY, side=VIDEO_DETECT_SIDE):
    """(track ids, boxes) in analysed frame number `frame`: detected on every `detect_every`-th
    frame (on a copy at most `side` pixels across), carried by the tracker in between."""
    if frame % detect_every == 0:
        boxes = detect_faces(cascade, grey, side)
        return tracker.update(boxes, frame), boxes
    return tracker.carry(frame, grey.shape[1], grey.shape[0])


def read_frames(cap, every, camera, fps):
    """(frame index, time in seconds, BGR frame) of every `every`-th frame; skipped frames are
    only grabbed (demuxed and decoded, not converted). Stops at the first frame that cannot be
    read. A file's time is the frame's own timestamp, right for variable frame rates too (phone
    videos), or index / fps where the file gives none; a camera's is the wall clock since its
    first frame."""
    import time

    import cv2
    index, start = 0, None
    while True:
        ok, frame = cap.read()
        if not ok or frame is None:
            return
        if camera:
            start = time.monotonic() if start is None else start
            seconds = time.monotonic() - start
        else:
            stamp = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000
            seconds = stamp if stamp > 0 or index == 0 else index / fps
        yield index, seconds, frame
        for _ in range(every - 1):
            index += 1
            if not cap.grab():
                return
        index += 1


def open_preview():
    """An OpenCV window for --show, or None (with a note) where OpenCV has no GUI."""
    import cv2
    try:
        cv2.namedWindow("infer.py --show", cv2.WINDOW_NORMAL)
        return "infer.py --show"
    except cv2.error:
        warn("--show: this OpenCV has no GUI support (opencv-python-headless?); no preview window, "
             "the files are written as usual (pip install opencv-python for a window)")
        return None


def classify_video(source, name, predict_faces, out_dir, cascade=None, every=1,
                   detect_every=DETECT_EVERY, detect_side=VIDEO_DETECT_SIDE, smooth=True,
                   show=False, log=print, on_faces=None):
    """Find, track and classify the faces of a video file or camera; write into out_dir:
    frames.csv (one row per face per analysed frame, a 'no face' row for a frame without one;
    flushed frame by frame), annotated.mp4 (at the analysed frame rate), timeline.png and
    summary.json. Every `every`-th frame is analysed; faces are detected on every
    `detect_every`-th analysed frame, on a copy at most `detect_side` pixels across, and the
    tracker carries the boxes in between. All faces of a frame are classified in one batch.

    `on_faces(out_dir, "frame<index>", faces, probs)`, when given, also receives the face crops
    of every analysed frame that has faces (for Grad-CAM maps).

    Ctrl-C finishes the files for the frames analysed so far; for a file it is raised again
    (the command stops), for a camera it is the normal end. Returns the summary dict; raises
    Skipped when the source cannot be opened, holds no frame or out_dir cannot be written."""
    import csv
    import time

    import cv2
    from tqdm import tqdm
    camera = isinstance(source, int)
    cascade = face_detector() if cascade is None else cascade
    cap, fps, announced = open_video(source)
    writer, size, csv_file, preview, bar = None, None, None, None, None
    timing = dict.fromkeys(("read", "detect", "classify", "write"), 0.0)
    tracker, analysed, last, interrupted, started = Tracker(), 0, None, False, time.monotonic()
    try:
        try:
            os.makedirs(out_dir, exist_ok=True)
            csv_file = open(os.path.join(out_dir, "frames.csv"), "w", newline="", encoding="utf-8")
        except OSError as err:
            raise Skipped(f"cannot write its output folder {out_dir}: {err.strerror or err}") from err
        table = csv.writer(csv_file, lineterminator="\n")
        table.writerow(frame_columns())
        preview = open_preview() if show else None
        bar = tqdm(total=announced // every if announced else None, desc=name, unit="frame",
                   disable=camera or None, file=sys.stderr, dynamic_ncols=True, leave=False)
        second = 0
        clock = time.perf_counter()
        for index, seconds, frame in read_frames(cap, every, camera, fps):
            now = time.perf_counter()
            timing["read"] += now - clock
            height, width = frame.shape[:2]
            grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            ids, boxes = face_boxes(tracker, cascade, grey, analysed, detect_every, detect_side)
            clock, now = now, time.perf_counter()
            timing["detect"] += now - clock
            crops = np.stack([crop_face(grey, box) for box in boxes]) if boxes else None
            probs = predict_faces(crops) if boxes else np.zeros((0, len(EMOTIONS)))
            if on_faces is not None and boxes:
                on_faces(out_dir, f"frame{index:06d}", crops, probs)
            clock, now = now, time.perf_counter()
            timing["classify"] += now - clock
            rows, labels = [], []
            for tid, box, p in zip(ids, boxes, probs):
                best = int(p.argmax())
                rows.append([name, index, f"{seconds:.3f}", tid, *map(int, box), EMOTIONS[best],
                             f"{p[best]:.6f}", *(f"{v:.6f}" for v in p)])
                shown = tracker.smoothed(tid, p) if smooth else p
                labels.append((box, EMOTIONS[int(shown.argmax())], float(shown.max()), tid))
            annotate(frame, labels)
            if size is None:  # the first frame gives the video's size
                size = (width, height)
                writer = open_writer(os.path.join(out_dir, "annotated.mp4"), fps / every, size)
            if writer is not None:
                writer.write(frame if (width, height) == size else cv2.resize(frame, size))
            # The frame's rows right after its video frame (a Ctrl-C lands between the two only
            # in that instant), flushed: an interrupted run keeps every analysed frame.
            table.writerows(rows or [[name, index, f"{seconds:.3f}", "", "", "", "", "", "no face",
                                      "", *[""] * len(EMOTIONS)]])
            csv_file.flush()
            analysed, last = analysed + 1, (index, seconds)
            if preview:
                cv2.imshow(preview, frame)
                if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                    raise KeyboardInterrupt
            bar.update(1)
            if camera and int(seconds) > second:  # one live line per second
                second = int(seconds)
                rate = analysed / max(time.monotonic() - started, 1e-9)
                said = ", ".join(f"#{t} {e} {c:.0%}" for _, e, c, t in labels) or "no face"
                log(f"{seconds:6.1f} s  {len(labels)} face(s): {said}  ({rate:.1f} frames/s)")
            clock = time.perf_counter()
            timing["write"] += clock - now
    except KeyboardInterrupt:
        interrupted = True
    finally:
        cap.release()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.release()
        if csv_file is not None:
            csv_file.close()
        if preview:
            cv2.destroyWindow(preview)
    elapsed = time.monotonic() - started
    if analysed == 0 and not interrupted:
        os.remove(os.path.join(out_dir, "frames.csv"))  # nothing but its header
        with contextlib.suppress(OSError):
            os.rmdir(out_dir)
        raise Skipped("has no frame that could be read (an empty or unreadable video)")
    stopped = None
    if not interrupted and not camera and last and cut_short(*last, every, announced, fps):
        stopped = (f"stopped at frame {last[0]} ({last[1]:.2f} s) of the {announced} its header "
                   "announces: the rest could not be read (truncated or corrupt file)")
        warn(f"{source} {stopped}; the readable part was processed")
    summary = finish_video(out_dir, name, source, fps, every, analysed, last, announced, camera,
                           elapsed, timing, stopped, interrupted)
    log(f"{name}: {analysed} frame(s) analysed ({summary['frames_per_s']:.1f}/s), "
        f"{len(summary['tracks'])} track(s)"
        + "".join(f"; #{t['track']} {t['dominant']} {t['time_on_screen_s']:.1f} s"
                  for t in summary["tracks"][:5]) + f"; wrote {', '.join(VIDEO_FILES)} to {out_dir}")
    if interrupted and not camera:
        where = f"frame {last[0]} ({last[1]:.2f} s)" if last else "its first frame"
        warn(f"interrupted: {source} stopped after {where}; its files cover the {analysed} "
             "frame(s) analysed up to there")
        raise KeyboardInterrupt
    return summary


def cut_short(last_index, last_seconds, every, announced, fps):
    """Whether reading a file stopped well before the end its header announces. Both the frame
    index and the time must fall short: MKV and WebM headers hold no frame count, and the one
    estimated from their duration can be too high for a variable frame rate, while the time of
    their last frame still reaches that duration (announced / fps)."""
    return bool(announced) and (last_index + every < announced * 0.99
                                and last_seconds + every / fps < announced / fps * 0.99)


def open_writer(path, fps, size):
    """A cv2.VideoWriter for MP4 (mp4v) that remembers its frame size, or None (with a warning)."""
    import cv2
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), max(fps, 0.1), size)
    if not writer.isOpened():
        warn(f"{path}: could not open a video writer (no MP4 encoder?); no annotated video")
        return None
    return writer


def read_frames_table(path):
    """frames.csv as a DataFrame; the face rows only (no 'no face' rows)."""
    import pandas as pd
    table = pd.read_csv(path, keep_default_na=False, na_values={"track": [""]})
    return table[table["emotion"] != "no face"].astype({"track": int})


def track_summaries(faces, interval, every):
    """Per track, longest on screen first: time on screen, first and last time, the share of
    frames with each emotion and the dominant emotion (raw labels). Each analysed frame of the
    track counts for the time to the next analysed frame when the track is seen there too (its
    real spacing, right for variable frame rates), else for the nominal `interval`."""
    out = []
    for tid, rows in faces.groupby("track"):
        shares = rows["emotion"].value_counts(normalize=True)
        spacing = np.diff(rows["time_s"].to_numpy(float))[np.diff(rows["frame"].to_numpy()) == every]
        out.append({"track": int(tid), "frames": len(rows),
                    "time_on_screen_s": round(spacing.sum() + (len(rows) - len(spacing)) * interval, 3),
                    "first_s": float(rows["time_s"].min()), "last_s": float(rows["time_s"].max()),
                    "emotions": {n: round(float(shares.get(n, 0.0)), 4) for n in EMOTIONS},
                    "dominant": shares.index[0]})
    return sorted(out, key=lambda t: (-t["frames"], t["track"]))


def save_timeline(faces, tracks, every, title, path):
    """timeline.png: per track (the TIMELINE_TRACKS longest), its seven probabilities against
    time in the emotions' colours; a gap where the track was not seen."""
    from matplotlib.figure import Figure
    shown = tracks[:TIMELINE_TRACKS]
    fig = Figure(figsize=(9, 0.6 + 1.7 * max(1, len(shown))))
    axes = np.atleast_1d(fig.subplots(max(1, len(shown)), 1, sharex=True, squeeze=False)[:, 0])
    for ax, track in zip(axes, shown):
        rows = faces[faces["track"] == track["track"]]
        t = rows["time_s"].to_numpy(float)
        gaps = np.flatnonzero(np.diff(rows["frame"].to_numpy()) > every) + 1  # NaN breaks the line there
        for name in EMOTIONS:
            b, g, r = EMOTION_COLOURS[name]
            p = rows[f"p_{name}"].to_numpy(float)
            ax.plot(np.insert(t, gaps, np.nan), np.insert(p, gaps, np.nan), color=(r / 255, g / 255, b / 255),
                    lw=1.4, label=name)
        ax.set_ylim(0, 1)
        ax.set_ylabel("probability", fontsize=8)
        ax.set_title(f"track #{track['track']}: {track['time_on_screen_s']:.1f} s on screen, mostly "
                     f"{track['dominant']}", fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    if not shown:
        axes[0].text(0.5, 0.5, "no face found", ha="center", va="center", transform=axes[0].transAxes)
    else:
        axes[0].legend(ncol=7, fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.18), frameon=False)
    if len(tracks) > len(shown):
        title += f" ({len(tracks) - len(shown)} shorter track(s) not shown)"
    axes[-1].set_xlabel("time (s)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def finish_video(out_dir, name, source, fps, every, analysed, last, announced, camera, elapsed,
                 timing, stopped, interrupted):
    """timeline.png and summary.json, both from frames.csv as written (so they agree with it)."""
    table = read_frames_table(os.path.join(out_dir, "frames.csv"))
    if camera:  # the analysed rate is what the machine kept up with
        interval = elapsed / max(1, analysed)
    else:
        interval = every / fps
    tracks = track_summaries(table, interval, every)
    save_timeline(table, tracks, every, f"{name}: emotion probabilities per tracked face",
                  os.path.join(out_dir, "timeline.png"))
    total = sum(timing.values()) or 1.0
    summary = {"video": source if camera else os.fspath(source), "camera": camera,
               "fps": fps, "every": every, "analysed_fps": 1 / interval,
               "frames_analysed": analysed, "frames_announced": announced or None,
               "last_frame": last[0] if last else None, "last_time_s": last[1] if last else None,
               "stopped_early": stopped, "interrupted": interrupted,
               "frames_per_s": analysed / max(elapsed, 1e-9), "seconds": round(elapsed, 3),
               "time_share": {k: round(v / total, 4) for k, v in timing.items()},
               "tracks": tracks, "files": {f: os.path.join(out_dir, f) for f in VIDEO_FILES}}
    save_json(summary, os.path.join(out_dir, "summary.json"))
    return summary


def classify_videos(inputs, predict_faces, out_dir, every=1, detect_every=DETECT_EVERY,
                    smooth=True, show=False, log=print, on_faces=None):
    """classify_video for each video file (folders: their videos) or camera index in `inputs`,
    each into out_dir/<video name>/. A video that cannot be used is named in one warning line and
    the others are still processed. Returns the summaries; raises UserError when not one video
    could be processed, and KeyboardInterrupt (after finishing the files) on Ctrl-C in a file."""
    sources, skipped = find_videos(inputs)
    for path, reason in skipped:
        warn(f"{path} {reason}; skipped")
    cascade = face_detector()
    summaries, used = [], set()
    for source, name in sources:
        folder = name
        k = 1
        while folder.lower() in used:
            k += 1
            folder = f"{name}_{k}"
        used.add(folder.lower())
        try:
            summaries.append(classify_video(source, name, predict_faces, os.path.join(out_dir, folder),
                                            cascade, every, detect_every, smooth=smooth, show=show,
                                            log=log, on_faces=on_faces))
        except Skipped as why:
            what = f"camera {source}" if isinstance(source, int) else source
            warn(f"{what} {why}; skipped")
            skipped.append((source, str(why)))
    if not summaries:
        given = ", ".join(map(str, inputs))
        raise UserError(f"nothing could be processed: no usable video in {given}"
                        + ("" if sources or skipped else " (no video files found)"))
    if skipped:
        log(f"{len(summaries)} video(s) processed, {len(skipped)} skipped")
    return summaries
