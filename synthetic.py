"""python3 synthetic.py --out data/synthetic.csv --preview outputs/synthetic_preview.png

Procedural synthetic 48x48 grey "faces" in FER2013's format: the project's built-in default
dataset, so everything runs without downloading FER2013.

Each face is drawn with soft (anti-aliased) shapes on coordinate grids, numpy only, vectorised
over batches of faces. The emotion shows in the mouth, the eyes and the brows:

    Angry     brows slanted down toward the middle (V), lowered; tight flat or bared mouth
    Disgust   crooked wavy mouth, one brow lowered, narrowed eyes
    Fear      wide eyes, raised brows slanted up toward the middle, stretched open mouth
    Happy     smiling mouth (upward curve, sometimes open with teeth), squinted eyes
    Sad       frown (downward curve), brows slanted up toward the middle
    Surprise  round open mouth (O), wide eyes, high arched brows
    Neutral   flat mouth, normal eyes, straight brows

Nuisances: face position, scale and tilt, face shape, hair, skin brightness, lighting,
background gradient, contrast, blur and gaussian noise; every expression feature has a random
intensity, and the ranges of neighbouring classes overlap a little (weak smile vs neutral, etc.),
so the task is learnable but not trivial. Class proportions follow FER2013's Training split.

API (used by the other scripts):
    make_faces(labels, rng) -> uint8 (N, 48, 48)
    make_synthetic(n_train, n_val, n_test, seed) -> (images, labels, usage)
    write_synthetic_csv(path, n_train, n_val, n_test, seed) -> path
"""
import os
import sys

import numpy as np

from utils import EMOTIONS, SIDE, SPLITS, Parser, atomic_write, flag, run_cli, save_figure

FER_TRAIN_COUNTS = (3995, 436, 4097, 7215, 4830, 3171, 4965)
_UNIT = 25.0  # pixels per face unit at scale 1 (the face is about 2 units tall)

# Per-class ranges (low, high) of the expression parameters, in face units (1 unit ~ 25 px at
# scale 1; y grows downward). Order of classes: Angry, Disgust, Fear, Happy, Sad, Surprise, Neutral.
_EXPR = {
    # mouth half-width
    "mouth_w":    [(0.23, 0.31), (0.23, 0.32), (0.31, 0.41), (0.29, 0.39), (0.23, 0.32), (0.12, 0.18), (0.24, 0.33)],
    # smile (+: corners up) / frown (-: corners down), as the drop of the middle below the corners
    "bend":       [(-0.055, 0.005), (-0.07, 0.015), (-0.085, 0.0), (0.055, 0.21), (-0.195, -0.04), (-0.015, 0.015), (-0.035, 0.05)],
    # opening above / below the mouth line (0: closed)
    "open_top":   [(0.0, 0.0), (0.0, 0.04), (0.055, 0.11), (0.0, 0.0), (0.0, 0.0), (0.10, 0.18), (0.0, 0.0)],
    "open_bot":   [(0.0, 0.0), (0.0, 0.03), (0.10, 0.18), (0.0, 0.17), (0.0, 0.0), (0.125, 0.235), (0.0, 0.0)],
    # crooked mouth: linear tilt (sign drawn at random) and waviness
    "mouth_tilt": [(0.0, 0.015), (0.05, 0.12), (0.0, 0.015), (0.0, 0.015), (0.0, 0.015), (0.0, 0.01), (0.0, 0.015)],
    "wave":       [(0.0, 0.0), (0.02, 0.045), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)],
    # eye opening, as a multiple of the neutral eye height
    "eye_open":   [(0.55, 0.93), (0.40, 0.75), (1.35, 1.80), (0.40, 0.75), (0.62, 0.93), (1.50, 1.95), (0.82, 1.18)],
    # brows: raise (+: up), slant (+: inner ends down, V; -: inner ends up), arch, asymmetry
    "brow_raise": [(-0.10, -0.03), (-0.04, 0.015), (0.055, 0.125), (0.0, 0.055), (0.0, 0.055), (0.10, 0.18), (-0.03, 0.03)],
    "brow_slant": [(0.085, 0.18), (0.015, 0.07), (-0.125, -0.055), (-0.015, 0.03), (-0.155, -0.055), (-0.015, 0.015), (-0.03, 0.03)],
    "brow_arch":  [(0.0, 0.02), (0.0, 0.02), (0.0, 0.03), (0.01, 0.04), (0.0, 0.02), (0.03, 0.07), (0.01, 0.04)],
    "brow_asym":  [(0.0, 0.01), (0.05, 0.11), (0.0, 0.01), (0.0, 0.01), (0.0, 0.01), (0.0, 0.01), (0.0, 0.01)],
}
# expression intensity (fraction of the step from a neutral face to the class's full values):
# clear for most faces, subtle for a few
_CLEAR = (0.5, 1.0)
_SUBTLE = (0.1, 0.4)
_P_SUBTLE = 0.12
# probability that an open mouth shows teeth / that a happy mouth is an open smile
_P_TEETH = np.array([0.45, 0.3, 0.6, 0.85, 0.0, 0.15, 0.0])
_P_OPEN = np.array([0.45, 0.5, 1.0, 0.5, 0.0, 1.0, 0.0])  # Angry "open" = bared teeth


def _allocate(n, weights=FER_TRAIN_COUNTS, minimum=None):
    """Exact class counts for n samples by largest remainder, with every class at least
    `minimum` times (default min(3, n // 7)), taken from the largest classes."""
    w = np.asarray(weights, dtype=np.float64)
    quota = n * w / w.sum()
    counts = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    minimum = min(3, n // len(w)) if minimum is None else minimum
    while counts.min() < minimum:
        counts[np.argmin(counts)] += 1
        counts[np.argmax(counts)] -= 1
    return counts


def _alpha(d, S, soft=1.0):
    """Coverage of a shape from its signed distance d (face units, negative inside), with a
    linear edge `soft` pixels wide: anti-aliasing."""
    return np.clip(0.5 - d * (S / soft), 0.0, 1.0)


def _ellipse_sd(u, v, cx, cy, a, b):
    """Approximate signed distance to an axis-aligned ellipse (first order: (q - 1) / |grad q|)."""
    ia, ib = 1.0 / a, 1.0 / b
    x = (u - cx) * ia
    y = (v - cy) * ib
    x *= x
    y *= y
    q = np.sqrt(x + y)
    x *= ia * ia
    y *= ib * ib
    g = np.sqrt(x + y)
    g += 1e-6
    return (q - 1.0) * q / g


def _stroke_sd(u, v, x0, x1, c0, c1, c2, width):
    """Signed distance to a thick curve y = c0 + c1 x + c2 x^2 for x in [x0, x1] (round-ish caps)."""
    p = np.clip(u, x0, x1)
    f = c0 + (c1 + c2 * p) * p
    fp = c1 + 2.0 * c2 * p
    dy = (v - f) / np.sqrt(1.0 + fp * fp)
    dx = u - p
    return np.sqrt(dx * dx + dy * dy) - 0.5 * width


def _sample_params(labels, rng):
    """All random parameters for the faces, as 1-D arrays (one value per face)."""
    n = len(labels)
    P = {}
    U = lambda lo, hi: rng.uniform(lo, hi, n)  # noqa: E731
    # --- pose and identity
    P["cx"] = U(22.5, 25.5)
    P["cy"] = U(23.0, 26.0)
    P["scale"] = U(0.85, 1.08)
    P["tilt"] = rng.normal(0.0, 0.04, n)  # head tilt, radians
    P["face_a"] = U(0.70, 0.84)
    P["face_b"] = U(0.95, 1.08)
    P["chin"] = U(0.05, 0.22)  # how much the face narrows toward the chin
    P["eye_x"] = U(0.28, 0.35)
    P["eye_y"] = U(-0.16, -0.08)
    P["eye_w"] = U(0.15, 0.20)
    P["eye_h"] = U(0.085, 0.11)
    P["iris_r"] = U(0.075, 0.10)
    P["gaze_x"] = U(-0.04, 0.04)
    P["brow_gap"] = U(0.18, 0.25)  # brow line height above the eye centre
    P["brow_in"] = U(0.10, 0.16)
    P["brow_out"] = U(0.44, 0.54)
    P["brow_t"] = U(0.08, 0.12)
    P["nose_y"] = U(0.18, 0.28)
    P["mouth_y"] = U(0.46, 0.56)
    P["lip_t"] = U(0.055, 0.08)
    P["hair"] = (rng.random(n) > 0.12).astype(np.float64)
    P["hairline"] = U(-0.78, -0.55)
    P["hair_wave"] = U(0.0, 0.08)
    P["hair_phase"] = U(0.0, 2 * np.pi)
    P["hair_side"] = U(-0.15, 0.15)
    # --- intensities (grey levels)
    P["bg0"] = U(70.0, 190.0)
    P["bg1"] = np.clip(P["bg0"] + rng.normal(0.0, 25.0, n), 0, 255)
    P["bg_dir"] = U(0.0, 2 * np.pi)
    P["skin"] = U(110.0, 195.0)
    P["hair_tone"] = np.where(rng.random(n) < 0.8, U(10.0, 70.0), U(90.0, 200.0))
    P["light_x"] = U(-0.25, 0.25)
    P["light_y"] = U(-0.15, 0.15)
    P["dark"] = U(0.15, 0.40)  # brows, pupils, mouth interior, as a fraction of skin
    P["sclera"] = U(1.0, 1.25)
    P["contrast"] = U(0.8, 1.15)
    P["blur"] = U(0.0, 1.0)
    P["noise"] = U(2.0, 11.0)
    # --- expression
    # each face has an expression intensity k: its parameters are a neutral face's plus k times
    # the step toward its class's values. Most expressions are clear; a few are subtle and
    # shade into Neutral (as many of FER2013's do), which keeps even a good model below 100%.
    neutral = EMOTIONS.index("Neutral")
    subtle = rng.random(n) < _P_SUBTLE
    k = np.where(subtle, U(*_SUBTLE), U(*_CLEAR))
    k[labels == neutral] = 1.0
    for name, ranges in _EXPR.items():
        lo, hi = np.array(ranges).T
        base = U(lo[neutral], hi[neutral])
        P[name] = base + k * (rng.uniform(lo[labels], hi[labels]) - base)
    opened = rng.random(n) < _P_OPEN[labels]
    angry = labels == 0
    P["open_top"] = np.where(opened, P["open_top"], 0.0)
    P["open_bot"] = np.where(opened, P["open_bot"], 0.0)
    bared = opened & angry
    P["open_top"] = np.where(bared, U(0.02, 0.045), P["open_top"])
    P["open_bot"] = np.where(bared, U(0.02, 0.045), P["open_bot"])
    P["teeth"] = ((rng.random(n) < _P_TEETH[labels]) & opened).astype(np.float64)
    P["tilt_sign"] = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    P["asym_side"] = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    return P


def _blur3(img):
    """Separable [1, 2, 1] / 4 blur with edge replication, over the last two axes."""
    p = np.pad(img, ((0, 0), (1, 1), (0, 0)), mode="edge")
    img = 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]
    p = np.pad(img, ((0, 0), (0, 0), (1, 1)), mode="edge")
    return 0.25 * p[:, :, :-2] + 0.5 * p[:, :, 1:-1] + 0.25 * p[:, :, 2:]


class _Canvas:
    """A batch of faces being drawn: the face coordinates (u, v) of every pixel (face units,
    turned by the tilt), and the image painted over layer by layer."""

    def __init__(self, P):
        B = len(P["cx"])
        Q = self.Q = {k: np.asarray(v, dtype=np.float32).reshape(B, 1, 1) for k, v in P.items()}
        yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
        xx = xx[None] + 0.5
        yy = yy[None] + 0.5
        S = self.S = _UNIT * Q["scale"]  # pixels per face unit
        c, s = self.c, self.s = np.cos(Q["tilt"]), np.sin(Q["tilt"])
        dx, dy = xx - Q["cx"], yy - Q["cy"]
        self.u = (c * dx + s * dy) / S
        self.v = (-s * dx + c * dy) / S
        # background: linear gradient between two grey levels
        t = (np.cos(Q["bg_dir"]) * (xx - SIDE / 2) + np.sin(Q["bg_dir"]) * (yy - SIDE / 2)) / SIDE + 0.5
        self.img = Q["bg0"] + (Q["bg1"] - Q["bg0"]) * np.clip(t, 0, 1)

    def paint(self, alpha, tone, win=None):
        """Blend `tone` over the image with opacity `alpha` (inside window `win` when given)."""
        if win is None:
            self.img = self.img + alpha * (tone - self.img)
        else:
            if np.ndim(tone) == 3 and np.shape(tone)[1] > 1:
                tone = tone[(slice(None),) + win]
            sub = self.img[(slice(None),) + win]
            sub += alpha * (tone - sub)

    def window(self, u0, u1, v0, v1, margin=3.0):
        """Row and column slices covering the face-unit box [u0, u1] x [v0, v1] for the whole
        batch, and u, v inside them."""
        Q, S, c, s = self.Q, self.S, self.c, self.s
        us = np.array([u0, u1, u0, u1], dtype=np.float32)
        vs = np.array([v0, v0, v1, v1], dtype=np.float32)
        px = Q["cx"][:, :, 0] + S[:, :, 0] * (c[:, :, 0] * us - s[:, :, 0] * vs)
        py = Q["cy"][:, :, 0] + S[:, :, 0] * (s[:, :, 0] * us + c[:, :, 0] * vs)
        r0, r1 = int(max(np.floor(py.min() - margin), 0)), int(min(np.ceil(py.max() + margin), SIDE))
        c0, c1 = int(max(np.floor(px.min() - margin), 0)), int(min(np.ceil(px.max() + margin), SIDE))
        r1, c1 = max(r1, r0 + 1), max(c1, c0 + 1)
        win = (slice(r0, r1), slice(c0, c1))
        return win, self.u[(slice(None),) + win], self.v[(slice(None),) + win]


def _render(P, noise):
    """Draw a batch of faces from parameter arrays (each (B,)); noise: (B, 48, 48) N(0, 1)."""
    canvas = _Canvas(P)
    Q, S, u, v, paint = canvas.Q, canvas.S, canvas.u, canvas.v, canvas.paint
    skin = Q["skin"] * (1.0 + Q["light_x"] * u + Q["light_y"] * v)
    dark = Q["skin"] * Q["dark"]
    hair_tone = Q["hair_tone"]

    # hair behind the head
    back = _alpha(_ellipse_sd(u, v, Q["hair_side"] * 0.3, -0.12, Q["face_a"] + 0.12, Q["face_b"] + 0.1), S, 1.5)
    back = back * np.clip((0.25 - v) * S / 3.0, 0, 1)
    paint(back * Q["hair"], hair_tone)
    # neck
    win, uu, vv = canvas.window(-0.5, 0.5, 0.55, 2.2)
    neck = _alpha(np.maximum(np.abs(uu) - 0.42, 0.6 - vv), S)
    paint(neck, skin * 0.8, win)
    # face: an egg, narrower at the chin
    a_face = Q["face_a"] * (1.0 - Q["chin"] * np.clip(v, 0, None))
    face_d = _ellipse_sd(u, v, 0.0, 0.0, a_face, Q["face_b"])
    face = _alpha(face_d, S, 1.2)
    paint(face, skin)
    # fringe: hair over the top of the face, above a wavy hairline
    win, uu, vv = canvas.window(-1.0, 1.0, -1.25, -0.3)
    line = Q["hairline"] + Q["hair_wave"] * np.cos(7.0 * uu + Q["hair_phase"]) + Q["hair_side"] * uu
    fringe = face[(slice(None),) + win] * np.clip((line - vv) * S / 1.5 + 0.5, 0, 1)
    paint(fringe * Q["hair"], hair_tone, win)
    _draw_eyes(canvas, dark)
    _draw_nose(canvas, dark)
    _draw_mouth(canvas, dark)

    # global contrast, blur and noise
    img = 128.0 + Q["contrast"] * (canvas.img - 128.0)
    img = img + Q["blur"] * (_blur3(img) - img)
    img = img + Q["noise"] * noise
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)  # +0.5 then truncation: rounding


def _draw_eyes(canvas, dark):
    """Eyes and brows, one side at a time (side = -1: image left, +1: image right); each feature
    is drawn only inside a window of rows and columns that holds it for the whole batch."""
    Q, S, paint = canvas.Q, canvas.S, canvas.paint
    for side in (-1.0, 1.0):
        win, uu, vv = canvas.window(min(0.0, 0.75 * side), max(0.0, 0.75 * side), -0.8, 0.3)
        ex = side * Q["eye_x"]
        ey = Q["eye_y"]
        # Disgust: the brow on one side is lowered and the eye under it narrows a bit more
        low = (Q["asym_side"] == side).astype(np.float32)
        eh = Q["eye_h"] * Q["eye_open"] * (1.0 - 2.0 * Q["brow_asym"] * low)
        socket = _alpha(_ellipse_sd(uu, vv, ex, ey - 0.03, Q["eye_w"] * 1.5, 0.16), S, 3.0)
        paint(0.22 * socket, dark, win)
        eye_d = _ellipse_sd(uu, vv, ex, ey, Q["eye_w"], eh)
        eye = _alpha(eye_d, S)
        paint(eye, np.minimum(Q["skin"] * Q["sclera"] + 15.0, 255.0), win)
        iris = _alpha(_ellipse_sd(uu, vv, ex + Q["gaze_x"], ey, Q["iris_r"], Q["iris_r"]), S) * eye
        paint(iris, dark, win)
        lid = _alpha(np.abs(eye_d) - 0.018, S) * np.clip((ey - vv) * S + 1.0, 0, 1)
        paint(0.8 * lid, dark, win)
        # brow: local x grows outward; slant > 0 lowers the inner end (V)
        # y = base + slant * (x1 - x) / (x1 - x0) - arch * (1 - ((x - xm) / hw)^2)
        x0, x1 = Q["brow_in"], Q["brow_out"]
        base = ey - Q["brow_gap"] - Q["brow_raise"] + Q["brow_asym"] * low
        k = Q["brow_slant"] / (x1 - x0)
        xm, hw = 0.5 * (x0 + x1), 0.5 * (x1 - x0)
        ar = Q["brow_arch"] / (hw * hw)
        c0 = base + k * x1 - Q["brow_arch"] + ar * xm * xm
        c1 = -k - 2.0 * ar * xm
        brow = _alpha(_stroke_sd(side * uu, vv, x0, x1, c0, c1, ar, Q["brow_t"]), S)
        paint(0.9 * brow, dark, win)


def _draw_nose(canvas, dark):
    """A soft shadow on one side and two nostrils."""
    Q, S, paint = canvas.Q, canvas.S, canvas.paint
    win, uu, vv = canvas.window(-0.25, 0.25, -0.15, 0.4)
    ny = Q["nose_y"]
    shade = _alpha(_stroke_sd(vv, uu, ny - 0.25, ny - 0.02, 0.06 * np.sign(Q["light_x"] + 1e-3), 0.0, 0.0, 0.05), S, 2.0)
    paint(0.25 * shade, dark, win)
    for side in (-1.0, 1.0):
        nostril = _alpha(_ellipse_sd(uu, vv, side * 0.065, ny, 0.045, 0.028), S)
        paint(0.55 * nostril, dark, win)


def _draw_mouth(canvas, dark):
    """A centre line y(x) and an opening between top(x) and bot(x); lips and teeth."""
    Q, S, paint = canvas.Q, canvas.S, canvas.paint
    win, uu, vv = canvas.window(-0.55, 0.55, 0.1, 1.1)
    w = Q["mouth_w"]
    r = np.clip(uu / w, -1.0, 1.0)
    r2 = r * r
    yc = (Q["mouth_y"] + Q["bend"] * (1.0 - r2) + Q["tilt_sign"] * Q["mouth_tilt"] * r
          + Q["wave"] * np.sin(2.2 * np.pi * r))
    prof = np.sqrt(1.0 - r2)
    top = yc - Q["open_top"] * prof
    bot = yc + Q["open_bot"] * prof
    au = np.abs(uu)
    inside = _alpha(np.maximum(np.maximum(top - vv, vv - bot), au - w), S)
    # the lip line follows the same curve; thickness tapers toward the corners
    mouth_line = _alpha(np.maximum(np.abs(vv - yc) - 0.5 * Q["lip_t"] * (0.5 + 0.5 * prof), au - w), S)
    lips = _alpha(np.maximum(np.maximum(top - 0.05 - vv, vv - bot - 0.06), au - w - 0.03), S, 2.0)
    paint(0.18 * lips, dark, win)
    paint(np.maximum(inside, 0.9 * mouth_line), dark, win)
    teeth_edge = top + 0.55 * (bot - top)
    teeth = (inside * Q["teeth"] * np.clip((teeth_edge - vv) * S + 0.5, 0, 1)
             * np.clip((w * 0.85 - au) * S, 0, 1))
    paint(0.85 * teeth, np.minimum(Q["skin"] * 1.1 + 20.0, 255.0), win)


def make_faces(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 array (len(labels), 48, 48): one drawn face per label (0..6, see EMOTIONS)."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if labels.size and (labels.min() < 0 or labels.max() >= len(EMOTIONS)):
        raise ValueError(f"labels must be in 0..{len(EMOTIONS) - 1}")
    n = len(labels)
    out = np.empty((n, SIDE, SIDE), dtype=np.uint8)
    if n == 0:
        return out
    P = _sample_params(labels, rng)
    chunk = 64  # small batches stay in the CPU cache
    for i in range(0, n, chunk):
        sl = slice(i, min(i + chunk, n))
        noise = rng.standard_normal((sl.stop - sl.start, SIDE, SIDE), dtype=np.float32)
        out[sl] = _render({k: v[sl] for k, v in P.items()}, noise)
    return out


def make_synthetic(n_train=4000, n_val=800, n_test=800, seed=0):
    """(images uint8 N x 48 x 48, labels int64 N, usage: numpy array of str
    'Training'/'PublicTest'/'PrivateTest'), rows ordered Training, PublicTest, PrivateTest.

    Each split's class counts follow FER2013's Training proportions exactly (largest remainder),
    every class at least min(3, n // 7) times; labels are shuffled within a split. Each split
    has its own random stream, so e.g. changing n_val leaves the training split unchanged."""
    images, labels, usage = [], [], []
    for k, (name, n) in enumerate(zip(SPLITS.values(), (n_train, n_val, n_test))):
        n = int(n)
        if n < 0:
            raise ValueError(f"split sizes must be >= 0, got {n} for {name}")
        rng = np.random.default_rng([int(seed), k])
        y = np.repeat(np.arange(len(EMOTIONS), dtype=np.int64), _allocate(n))
        rng.shuffle(y)
        images.append(make_faces(y, rng))
        labels.append(y)
        usage.append(np.full(n, name))
    return (np.concatenate(images), np.concatenate(labels).astype(np.int64),
            np.concatenate(usage).astype(str))


def write_synthetic_csv(path, n_train=4000, n_val=800, n_test=800, seed=0) -> str:
    """Write a normal FER2013 CSV (header `emotion,pixels,Usage`; pixels: 2304 space-separated
    ints, row-major) and return the path. Parent folders are created; the write is atomic
    (temporary file in the same folder, then os.replace)."""
    path = os.fspath(path)
    images, labels, usage = make_synthetic(n_train, n_val, n_test, seed)

    def write(f):
        f.write(b"emotion,pixels,Usage\n")
        flat = images.reshape(len(images), -1)
        for i in range(0, len(flat), 1000):
            rows = [f"{y},{' '.join(map(str, px.tolist()))},{u}\n"
                    for y, px, u in zip(labels[i:i + 1000], flat[i:i + 1000], usage[i:i + 1000])]
            f.write("".join(rows).encode())
    atomic_write(path, write)
    return path


def save_preview(path, per_class=6, seed=0):
    """Save a PNG grid: `per_class` faces per emotion (one row each), labelled, for a person to check."""
    from matplotlib.figure import Figure
    labels = np.repeat(np.arange(len(EMOTIONS)), per_class)
    faces = make_faces(labels, np.random.default_rng(seed))
    fig = Figure(figsize=(1.3 * per_class, 1.45 * len(EMOTIONS)))
    axes = fig.subplots(len(EMOTIONS), per_class)
    for i, ax in enumerate(np.asarray(axes).reshape(-1)):
        ax.imshow(faces[i], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if i % per_class == 0:
            ax.set_ylabel(EMOTIONS[labels[i]], fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=80)


def main(argv=None):
    ap = Parser(prog="synthetic.py", description="Write a synthetic FER2013-format CSV of drawn faces.")
    flag(ap, "--out", required=True, help="CSV path to write (folders are created)")
    flag(ap, "--n_train", type=int, default=4000, help="Training faces (default: %(default)s)")
    flag(ap, "--n_val", type=int, default=800, help="PublicTest faces (default: %(default)s)")
    flag(ap, "--n_test", type=int, default=800, help="PrivateTest faces (default: %(default)s)")
    flag(ap, "--seed", type=int, default=0, help="(default: %(default)s)")
    flag(ap, "--preview", default=None, help="also save a PNG grid of faces per class here")
    flag(ap, "--debug", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    for name in ("n_train", "n_val", "n_test"):
        if getattr(args, name) < 0:
            ap.error(f"--{name} must be >= 0")
    if args.preview:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            ap.error("--preview needs matplotlib (pip install matplotlib)")
    path = write_synthetic_csv(args.out, args.n_train, args.n_val, args.n_test, args.seed)
    print(f"wrote {args.n_train + args.n_val + args.n_test} faces to {path}")
    if args.preview:
        print(f"preview: {save_preview(args.preview, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
