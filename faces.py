"""Pictures and faces: reading images, finding input files, face detectors, crops and drawing.

The detector seam (as deepface's): each detector is a class whose `detect(bgr_image)` returns face
boxes [(x, y, w, h)], and DETECTORS maps a name to it; adding one is a class and a dict line.
photos.py, video.py, predict.py and app.py build on these; this module knows no model.
"""
import contextlib
import math
import os
import sys
import threading

import numpy as np

from utils import EMOTIONS, SIDE, UserError, atomic_write

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # annotated copies keep these, else .png
# Everything OpenCV's imread decodes (its documentation's list); in folders these files are taken.
READ_EXTENSIONS = IMAGE_EXTENSIONS + (".jpe", ".dib", ".jp2", ".avif", ".tif", ".tiff", ".gif",
                                      ".pbm", ".pgm", ".ppm", ".pxm", ".pnm", ".pfm", ".sr", ".ras",
                                      ".exr", ".hdr", ".pic")

MAX_PIXELS = 50_000_000  # larger photos: JPEGs are decoded at 1/2, 1/4 or 1/8 scale, others refused
MAX_FILE_BYTES = 1 << 30
DETECT_SIDE = 1280  # faces are searched on a copy of the photo at most this many pixels across
FACE_MARGIN = 0.1  # the crop adds this fraction of the detected box on every side
# Measured on generated labelled scenes (tools/bench_detect.py, README "Finding faces"): for photos
# Haar's "high" strictness kept the recall of "normal" with half the false faces; on the 400-pixel
# copy of video frames it lost recall, and "normal" found no false faces there.
PHOTO_STRICTNESS, VIDEO_STRICTNESS = "high", "normal"
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
    except UnidentifiedImageError:  # maybe a format only OpenCV reads (e.g. HDR, PFM)
        return _read_with_opencv(path, max_pixels)
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
    image = _decode(path, flags)
    if image is None or image.size == 0:
        raise Skipped(f"could not be decoded as a {fmt} image (corrupt or truncated?)")
    return image, factor, note

def _decode(path, flags):
    """cv2.imdecode of the file's bytes, read here: OpenCV's own file functions crash on a name
    that is not UTF-8. None when OpenCV cannot decode them."""
    import cv2
    try:
        return cv2.imdecode(np.fromfile(path, np.uint8), flags)
    except OSError as err:
        raise Skipped(f"cannot be read ({err.strerror or err})") from err
    except cv2.error:
        return None

def _read_with_opencv(path, max_pixels):
    """Decode a file PIL cannot identify with OpenCV alone; its size is known only afterwards (OpenCV
    refuses more than 2**30 pixels itself)."""
    import cv2
    image = _decode(path, cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise Skipped("is not an image this tool can read (or it is corrupt)")
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

def warn(message):
    from tqdm import tqdm
    tqdm.write(f"warning: {message}", file=sys.stderr)

# ----------------------------------------------------------------------------- detectors

def _haar_cascade(file="haarcascade_frontalface_default.xml"):
    import cv2
    try:
        path = os.path.join(cv2.data.haarcascades, file)
    except AttributeError as err:
        raise UserError("this OpenCV has no bundled Haar cascades (OpenCV 5 dropped them); install "
                        "opencv-python-headless<5, or pass --no-detect for already-cropped "
                        "faces") from err
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise UserError(f"OpenCV's face detector {path} could not be loaded; reinstall "
                        "opencv-python-headless<5, or pass --no-detect for already-cropped faces")
    return cascade


def grey_of(image):
    """A grey uint8 copy of a BGR picture (a grey one as it is)."""
    import cv2
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def shrunk(grey, side):
    """(`grey` at most `side` pixels across, the scale used): detectors search the small copy."""
    import cv2
    h, w = grey.shape
    scale = min(1.0, side / max(h, w))
    if scale == 1.0:
        return grey, scale
    return cv2.resize(grey, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA), scale


def full_size(found, scale, width, height, min_face=0):
    """Boxes (x, y, w, h) found on a copy at `scale`, in the full picture's pixels, clipped to
    it, left to right; boxes narrower than `min_face` pixels are dropped."""
    boxes = []
    for x, y, bw, bh in found:
        x0, y0 = max(0, int(round(x / scale))), max(0, int(round(y / scale)))
        x1, y1 = min(width, int(round((x + bw) / scale))), min(height, int(round((y + bh) / scale)))
        if x1 - x0 >= max(min_face, 1) and y1 > y0:
            boxes.append((x0, y0, x1 - x0, y1 - y0))
    return sorted(boxes)


class HaarDetector:
    """OpenCV's frontal-face Haar cascade, shipped inside opencv-python(-headless) 4. The search
    runs on a copy at most `side` pixels across (fast on big photos); boxes are in the full
    picture's pixels, left to right. `strictness` is how many overlapping hits a face needs
    (minNeighbors); faces narrower than `min_face` pixels are dropped. Crops add FACE_MARGIN."""
    margin = FACE_MARGIN
    NEIGHBOURS = {"low": 3, "normal": 5, "high": 8}

    def __init__(self, side=DETECT_SIDE, min_face=0, strictness="normal"):
        self.cascade, self.side, self.min_face = _haar_cascade(), side, min_face
        self.neighbours = self.NEIGHBOURS[strictness]

    def search(self, cascade, small, scale):
        """(x, y, w, h) hits of one cascade on the small copy."""
        least = max(24, int(self.min_face * scale))
        found = cascade.detectMultiScale(small, scaleFactor=1.1, minNeighbors=self.neighbours,
                                         minSize=(least, least))
        return [tuple(map(int, box)) for box in found] if len(found) else []

    def detect(self, bgr_image):
        grey = grey_of(bgr_image)
        small, scale = shrunk(grey, self.side)
        return full_size(self.search(self.cascade, small, scale), scale, grey.shape[1], grey.shape[0], self.min_face)


class HaarProfileDetector(HaarDetector):
    """HaarDetector plus OpenCV's profile-face cascade, on the picture and on its mirror image (the
    cascade knows faces turned one way): faces in three-quarter view and profile too."""

    def __init__(self, side=DETECT_SIDE, min_face=0, strictness="normal"):
        super().__init__(side, min_face, strictness)
        self.profile = _haar_cascade("haarcascade_profileface.xml")

    def detect(self, bgr_image):
        grey = grey_of(bgr_image)
        small, scale = shrunk(grey, self.side)
        found = self.search(self.cascade, small, scale)
        width = small.shape[1]
        turned = self.search(self.profile, small, scale) + [
            (width - x - w, y, w, h) for x, y, w, h in self.search(self.profile, small[:, ::-1].copy(), scale)]
        for box in turned:  # a profile hit on a face already found is the same face
            if all(overlap(box, other) < 0.3 for other in found):
                found.append(box)
        return full_size(found, scale, grey.shape[1], grey.shape[0], self.min_face)


class HogDetector:
    """dlib's HOG face detector (a linear SVM on histograms of gradients; no model file): pip
    install dlib-bin. It finds faces from about 40 pixels across on the copy it searches (at most
    `side` pixels across) with `upsample` 1, the default; from 80 with 0 (about 3x faster). `strictness` moves its score
    threshold; faces narrower than `min_face` pixels are dropped. Crops add FACE_MARGIN."""
    margin = FACE_MARGIN
    THRESHOLDS = {"low": -0.3, "normal": 0.0, "high": 0.5}

    def __init__(self, side=DETECT_SIDE, min_face=0, strictness="normal", upsample=1):
        try:
            import dlib
        except ImportError as err:
            raise UserError("--detector hog needs dlib: pip install dlib-bin (or use --detector haar)") from err
        self.hog, self.side, self.min_face, self.upsample = dlib.get_frontal_face_detector(), side, min_face, upsample
        self.threshold = self.THRESHOLDS[strictness]

    def detect(self, bgr_image):
        grey = grey_of(bgr_image)
        small, scale = shrunk(grey, self.side)
        rects, _, _ = self.hog.run(np.ascontiguousarray(small), self.upsample, self.threshold)
        found = [(r.left(), r.top(), r.width(), r.height()) for r in rects]
        return full_size(found, scale, grey.shape[1], grey.shape[0], self.min_face)


class WholePicture:
    """No detection (`--no-detect`): the whole picture is one already-cropped face."""
    margin = 0.0

    def detect(self, bgr_image):
        return [(0, 0, bgr_image.shape[1], bgr_image.shape[0])]


def overlap(a, b):
    """Intersection over union of two (x, y, w, h) boxes."""
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    inter = max(0, min(ax + aw, bx + bw) - max(ax, bx)) * max(0, min(ay + ah, by + bh) - max(ay, by))
    return inter / (aw * ah + bw * bh - inter) if inter else 0.0


DETECTORS = {"haar": HaarDetector, "haar_profile": HaarProfileDetector, "hog": HogDetector}
_per_thread = threading.local()


def face_detector(name="haar", side=DETECT_SIDE, strictness=PHOTO_STRICTNESS, **settings):
    """The detector `name` (DETECTORS) searching at most `side` pixels across, with its
    `settings` (min_face, strictness), made once per thread and setting: loading a cascade takes
    ~80 ms (predict.detect_emotions may run for every frame), and an OpenCV CascadeClassifier
    must not be shared between threads."""
    made = _per_thread.__dict__.setdefault("detectors", {})
    key = (name, side, strictness, *sorted(settings.items()))
    if key not in made:
        made[key] = DETECTORS[name](side=side, strictness=strictness, **settings)
    return made[key]


def find_faces(image, detector):
    """(boxes, 48x48 grey crops) of the faces `detector` finds in a BGR or grey uint8 picture
    (WholePicture(): the picture is the face)."""
    boxes = detector.detect(image)
    if not boxes:
        return [], np.zeros((0, SIDE, SIDE), np.uint8)
    grey = grey_of(image)
    return boxes, np.stack([crop_face(grey, box, detector.margin) for box in boxes])


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

# ----------------------------------------------------------------------------- drawing

# One colour per emotion (BGR), for boxes, labels, the legend, the video and the timeline.
EMOTION_COLOURS = {"Angry": (40, 40, 220), "Disgust": (40, 150, 40), "Fear": (170, 60, 150),
                   "Happy": (0, 210, 255), "Sad": (200, 120, 30), "Surprise": (0, 140, 255),
                   "Neutral": (170, 170, 170)}

FONT_SCALE_MIN = 0.35  # labels are shrunk down to this to fit their width, then shortened
MIN_LABEL_WIDTH = 110  # pixels: a label is at least this wide, so "Surprise 87%" stays readable

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
    (see place_labels: labels never overlap and stay above, below or inside their own column,
    at least MIN_LABEL_WIDTH wide), plus a colour legend; an image without faces gets a 'no face
    found' note."""
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
    boxes, spans, labels = [], [], []
    for box, emotion, confidence, *track in faces:
        x, y, w, h = (int(v) for v in box)
        thick = max(1, round(max(w, h) / 100))
        tag = f"#{track[0]} " if track else ""
        texts = (f"{tag}{emotion} {confidence:.0%}", f"{tag}{emotion}", f"{tag}{emotion[:3]}",
                 emotion, emotion[:3])  # the first that fits the label's width
        fit = fit_label(texts, min(width, max(w, MIN_LABEL_WIDTH)), max(0.4, min(3.0, w / 160)),
                        max(1, thick // 2))
        boxes.append((x, y, w, h))
        # A small face's label may be wider than its box (readable, with its percentage): it
        # starts at the box's left edge, moved left where it would leave the picture.
        spans.append((x if fit is None else max(0, min(x, width - fit[2])), y, w, h))
        labels.append((emotion, thick, fit))
    if legend:
        draw_legend(image, boxes)
    tops = place_labels(spans, [None if fit is None else fit[2:4] for _, _, fit in labels], height)
    for (x, y, w, h), (emotion, thick, _) in zip(boxes, labels):  # all boxes under all labels
        cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1),
                      EMOTION_COLOURS.get(emotion, (0, 200, 0)), thick)
    for (x, _, _, _), (emotion, thick, fit), top in zip(spans, labels, tops):
        if top is None:
            continue
        colour = EMOTION_COLOURS.get(emotion, (0, 200, 0))
        text, scale, lw, lh, base = fit
        cv2.rectangle(image, (x, top), (x + lw - 1, top + lh - 1), colour, -1)
        cv2.putText(image, text, (x + 2, top + lh - base - 2), font, scale, text_colour(colour),
                    max(1, thick // 2), cv2.LINE_AA)
    return image

def write_image(path, image):
    """An annotated copy, written whole or not at all (not fsynced: running again remakes it)."""
    import cv2
    ext = os.path.splitext(path)[1].lower()
    ok, buf = cv2.imencode(ext if ext in IMAGE_EXTENSIONS else ".png", image)
    if not ok:
        raise OSError(f"could not encode {path}")
    atomic_write(path, lambda f: f.write(buf.tobytes()), durable=False)
