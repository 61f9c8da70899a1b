"""Face detection on a labelled set of generated scenes: recall, false detections and speed of
each detector setting (faces.DETECTORS), to choose infer.py's defaults from numbers.

    python3 tools/bench_detect.py --out results/bench_detect.json
    python3 tools/bench_detect.py --scenes 20 --configs haar hog      # a quick look

The set (drawn here, nothing downloaded): 640x480 scenes on scikit-image's sample pictures that
hold no human face (a cat, coffee, a rocket, textures, text, the moon, a horse), each with 0-3
faces pasted at known boxes: the astronaut's head (frontal; mirrored, turned up to 20 degrees
in the picture plane, 30-220 pixels wide, lighter or darker) and, as three-quarter views, her
head squeezed sideways to 65% of its width. A tenth of the scenes hold no face. A detection is
right when it overlaps a true face by IoU >= 0.4 (one detection per face); every other one is
false. Each setting also runs on 640x480 at the video copy's size (VIDEO_DETECT_SIDE).
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.bench_video import FACE_IN_HEAD, HEAD  # noqa: E402
from tools.common import machine_info  # noqa: E402

import faces  # noqa: E402
from utils import save_json  # noqa: E402

BACKGROUNDS = ("chelsea", "coffee", "rocket", "grass", "brick", "gravel", "page", "moon", "horse",
               "text", "camera_free")  # camera_free: the cameraman picture without its upper third
CONFIGS = {  # name: (detector, settings)
    "haar": ("haar", {}), "haar_low": ("haar", {"strictness": "low"}),
    "haar_high": ("haar", {"strictness": "high"}), "haar_min40": ("haar", {"min_face": 40}),
    "haar_profile": ("haar_profile", {}), "hog": ("hog", {}), "hog_upsample": ("hog", {"upsample": 1}),
    "hog_high": ("hog", {"strictness": "high"})}


def background(name, rng, size=(640, 480)):
    import cv2
    import skimage.data
    picture = (skimage.data.camera()[200:] if name == "camera_free" else
               (1 - skimage.data.horse()) * 255 if name == "horse" else getattr(skimage.data, name)())
    picture = np.asarray(picture, np.float32)
    picture = picture if picture.ndim == 3 else np.repeat(picture[:, :, None], 3, 2)
    picture = cv2.resize(picture[:, :, :3], size, interpolation=cv2.INTER_AREA)
    return np.clip(picture[:, :, ::-1] * rng.uniform(0.7, 1.1), 0, 255).astype(np.uint8)


def paste_face(scene, head, rng, taken):
    """Paste one variant of the head where it overlaps no earlier face; returns its face box, its
    kind ("frontal" or "turned"), or None when there is no room."""
    import cv2
    width = int(rng.uniform(30, 220))  # the face's width
    turned = rng.random() < 0.3
    scale = width / FACE_IN_HEAD[2]
    h, w = int(head.shape[0] * scale), int(head.shape[1] * scale * (0.65 if turned else 1.0))
    if h >= scene.shape[0] or w >= scene.shape[1] or min(h, w) < 8:
        return None
    part = cv2.resize(head, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) * rng.uniform(0.6, 1.2)
    angle = rng.uniform(-20, 20)
    part = cv2.warpAffine(part, cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0), (w, h),
                          borderMode=cv2.BORDER_REPLICATE)
    mirrored = rng.random() < 0.5
    part = part[:, ::-1] if mirrored else part
    for _ in range(20):
        y, x = int(rng.integers(0, scene.shape[0] - h)), int(rng.integers(0, scene.shape[1] - w))
        fx, fy, fw, fh = FACE_IN_HEAD
        fx = (head.shape[1] - fx - fw) if mirrored else fx
        squeeze = 0.65 if turned else 1.0
        box = (x + round(fx * scale * squeeze), y + round(fy * scale), round(fw * scale * squeeze), round(fh * scale))
        if all(faces.overlap((x, y, w, h), other) == 0 for other in taken):
            scene[y:y + h, x:x + w] = np.clip(part, 0, 255).astype(np.uint8)
            taken.append((x, y, w, h))
            return box, "turned" if turned else "frontal"
    return None


def make_scenes(n, seed=0):
    """[(scene, [(true box, kind)])]: n scenes, a tenth of them without a face."""
    import skimage.data
    rng = np.random.default_rng(seed)
    head = np.ascontiguousarray(skimage.data.astronaut()[HEAD[0]:HEAD[1], HEAD[2]:HEAD[3], ::-1])
    scenes = []
    for k in range(n):
        scene = background(BACKGROUNDS[k % len(BACKGROUNDS)], rng)
        truth, taken = [], []
        for _ in range(0 if k % 10 == 9 else int(rng.integers(1, 4))):
            placed = paste_face(scene, head, rng, taken)
            if placed:
                truth.append(placed)
        scenes.append((scene, truth))
    return scenes


def score(found, truth):
    """(right per kind {kind: [found, all]}, false detections) for one scene."""
    right, used = {}, set()
    for box, kind in truth:
        best = max(((faces.overlap(box, f), j) for j, f in enumerate(found) if j not in used), default=(0, None))
        hit = best[0] >= 0.4
        if hit:
            used.add(best[1])
        right.setdefault(kind, [0, 0])
        right[kind][0] += hit
        right[kind][1] += 1
    return right, len(found) - len(used)


def measure(config, scenes, side):
    name, settings = CONFIGS[config]
    detector = faces.DETECTORS[name](side=side, **settings)
    totals, false, started = {}, 0, time.perf_counter()
    for scene, truth in scenes:
        right, wrong = score(detector.detect(scene), truth)
        false += wrong
        for kind, (hits, count) in right.items():
            totals.setdefault(kind, [0, 0])
            totals[kind][0] += hits
            totals[kind][1] += count
    ms = (time.perf_counter() - started) / len(scenes) * 1000
    hits, count = sum(t[0] for t in totals.values()), sum(t[1] for t in totals.values())
    return {"config": config, "detector": name, "settings": settings, "side": side,
            "recall": hits / max(count, 1), "recall_by_kind": {k: h / c for k, (h, c) in totals.items()},
            "true_faces": count, "false_detections": false, "ms_per_scene": round(ms, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="tools/bench_detect.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenes", type=int, default=120)
    p.add_argument("--configs", nargs="+", choices=tuple(CONFIGS), default=list(CONFIGS))
    p.add_argument("--out", default="outputs/bench_detect.json")
    args = p.parse_args(argv)
    import cv2
    cv2.setNumThreads(1)  # as in a video worker; per-scene times comparable across settings
    scenes = make_scenes(args.scenes)
    report = {"machine": machine_info(), "scenes": args.scenes, "opencv_threads": 1, "runs": []}
    print("| setting | side | recall | frontal | turned | false detections | ms per 640x480 |\n|---|---|---|---|---|---|---|")
    for config in args.configs:
        for side in (faces.DETECT_SIDE, 400):
            try:
                result = measure(config, scenes, side)
            except Exception as err:  # e.g. dlib not installed
                print(f"| {config} | {side} | not measured: {err} |")
                continue
            report["runs"].append(result)
            kinds = result["recall_by_kind"]
            print(f"| {config} | {side} | {result['recall']:.3f} | {kinds.get('frontal', 0):.3f} | "
                  f"{kinds.get('turned', 0):.3f} | {result['false_detections']} | {result['ms_per_scene']} |", flush=True)
            save_json(report, args.out)
    print(f"\n{report['machine']['cpu']}; {sum(len(t) for _, t in scenes)} faces in {args.scenes} scenes; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
