"""Faces in your own photos: find them, classify them, annotate the photos, write faces.csv.

`infer.py --images PATH [PATH ...]` calls classify_photos; the model comes in as a function from
faces (N, 48, 48) to probabilities (N, 7), so this module knows nothing about checkpoints.
"""
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from faces import (IMAGE_EXTENSIONS, Skipped, WholePicture, annotate, face_detector, find_faces,
                   find_images, read_image, warn, write_image)
from utils import EMOTIONS, UserError, atomic_write, save_json

# The faces of up to this many photos (fewer when they hold more pixels) go through the model in
# one batch: one forward pass per photo made folders of small faces 3x slower.
PHOTO_BATCH, BATCH_PIXELS = 64, 100_000_000
FACES_LISTED = 10  # with at most this many faces, the terminal shows one line per face


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


@dataclass
class Results:
    """What classify_photos has found so far."""
    out_dir: str
    keep_crops: bool = False
    rows: list = field(default_factory=list)  # faces.csv rows
    kept: list = field(default_factory=list)  # (annotated copy's path, crops, probabilities)
    names: set = field(default_factory=set)  # annotated copies' names, lower case
    processed: int = 0


def classify_photos(inputs, predict_faces, out_dir, detector=None, log=print, keep_crops=False):
    """Find, crop and classify the faces in photos (files or folders); write annotated copies
    under out_dir/annotated/ and faces.csv / faces.json (boxes x, y, w, h in the pixels of the
    file; a photo without a face gets one row with emotion 'no face'). The faces of up to
    PHOTO_BATCH photos are classified in one batch. Unusable inputs are named in a warning and
    skipped.

    `predict_faces(faces)` maps uint8 faces (N, 48, 48) to probabilities (N, 7); `detector` finds
    the faces (faces.DETECTORS; default Haar; faces.WholePicture() for already-cropped faces).
    Returns {"processed": n, "skipped": [{file, reason}], "faces": [...], csv, json, ...}, and with
    `keep_crops` "crops": [(annotated copy's path, its face crops, their probabilities)] (for
    Grad-CAM maps); raises UserError when not a single image could be processed."""
    from tqdm import tqdm
    entries, skipped = usable_inputs(inputs)
    detector = detector or face_detector()
    detect = not isinstance(detector, WholePicture)
    results, pending, pixels = Results(out_dir, keep_crops), [], 0
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
        pending.append((path, name, image, factor, *find_faces(image, detector)))
        pixels += image.size
        if len(pending) >= PHOTO_BATCH or pixels >= BATCH_PIXELS:
            finish_batch(pending, predict_faces, results)
            pending, pixels = [], 0
    finish_batch(pending, predict_faces, results)
    if results.processed == 0:
        what = f"none of the {len(entries)} image files" if entries else "no image files were found"
        raise UserError(f"nothing could be processed: {what}"
                        f"{' could be read' if entries else ''} in {', '.join(map(str, inputs))}")
    faces = write_faces_table(results.rows, EMOTIONS, out_dir)
    result = {"processed": results.processed, "skipped": skipped, "detect": detect,
              "class_names": list(EMOTIONS), "faces": faces}
    save_json(result, os.path.join(out_dir, "faces.json"))
    say_results(results, len(skipped), detect, log)
    return dict(result, csv=os.path.join(out_dir, "faces.csv"), json=os.path.join(out_dir, "faces.json"),
                annotated_dir=os.path.join(out_dir, "annotated"), crops=results.kept)


def usable_inputs(inputs):
    """find_images' ([(path, output name)], [{file, reason}] passed over), the latter named in
    warnings (the first few of a folder's non-images, then a count)."""
    entries, passed_over = find_images(inputs)
    for path, reason, shown in passed_over:
        if shown:
            warn(f"{path} {reason}; skipped")
    hidden = sum(not shown for _, _, shown in passed_over)
    if hidden:
        warn(f"{hidden} more files that are not images; skipped")
    return entries, [{"file": path, "reason": reason} for path, reason, _ in passed_over]


def finish_batch(pending, predict_faces, results):
    """Classify the faces of the `pending` photos [(path, name, image, factor, boxes, crops)] in
    one batch, then write each annotated copy and add its rows to `results`."""
    crops = [photo[5] for photo in pending]
    if sum(map(len, crops)):
        probs = np.split(predict_faces(np.concatenate(crops)), np.cumsum([len(c) for c in crops])[:-1])
    else:
        probs = [np.zeros((0, len(EMOTIONS)))] * len(pending)
    for (path, name, image, factor, boxes, face_crops), p in zip(pending, probs):
        target = os.path.join(results.out_dir, "annotated", unique_name(name, results.names))
        if results.keep_crops and boxes:
            results.kept.append((target, face_crops, p))
        results.rows += photo_rows(path, boxes, p, factor, EMOTIONS, target)
        labels = [(box, EMOTIONS[int(q.argmax())], float(q.max())) for box, q in zip(boxes, p)]
        try:
            write_image(target, annotate(image, labels))
        except OSError as err:
            warn(f"{target}: could not write the annotated copy ({err})")
        results.processed += 1


def say_results(results, skipped, detect, log):
    """The summary lines: counts, emotions, and one line per face when there are few."""
    found = [r for r in results.rows if r["x"] is not None]
    no_face = len(results.rows) - len(found)
    log(f"{results.processed} image(s) processed: {len(found)} face(s), {no_face} image(s) without "
        f"a face, {skipped} input(s) skipped")
    if 0 < len(found) <= FACES_LISTED:
        for r in found:
            log(f"  {os.path.basename(r['file'])} face {r['face']}: {r['emotion']} {r['confidence']:.0%} "
                f"at x {r['x']}, y {r['y']}, {r['w']}x{r['h']}")
    elif found:
        counts = {n: sum(r["emotion"] == n for r in found) for n in EMOTIONS}
        log("  " + ", ".join(f"{n} {c}" for n, c in counts.items() if c))
    if no_face and detect:
        log("  (no face found: if those images are already-cropped faces, pass --no-detect)")
    log(f"wrote faces.csv, faces.json and annotated copies to {results.out_dir}")
