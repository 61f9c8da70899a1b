"""Folders of face images as a data set, as torchvision's ImageFolder reads them: the classes are
the folder names, files are taken by their extension, and every image is decoded once into the
same uint8 arrays as the CSV (a dataset.FerData), so training and reports do not change.

    python3 dataset.py -d my_faces/                   # classes, splits, files left out
    python3 run.py -d my_faces/ --init_from pretrained/fer2013_vgg2_4_2_conv5.pth
    python3 infer.py -c pretrained/fer2013_vgg2_4_2_conv5.pth -d my_faces/ --split all

Two layouts. Split folders, DIR/<split>/<class>/*, with the splits in common spellings (train,
training, Training; val, valid, validation, PublicTest; test, PrivateTest): a missing validation
or test split is a stratified tenth of train. Or class folders only, DIR/<class>/*: 80/10/10 per
class. Each class's files are ordered by a salted hash of their path and the first tenth (or two)
held out: the split depends neither on the order files are listed in nor on where the folder is,
so a folder always splits the same way, and adding a few files moves few of the others.

Class folders in common spellings (anger, angry, happiness, ...) become FER2013's classes, in its
order, so FER2013's models can be fine-tuned and evaluated on them; any other class (contempt)
is kept as its own, after them. The faces are cached (data/cache), keyed on every file's path,
size and modification time: a changed folder is decoded again.
"""
import csv
import hashlib
import io
import json
import os
import re
import time
from collections import Counter

import numpy as np

import dataset
import faces
from utils import EMOTIONS, MAX_CLASS_NAME, SIDE, SPLITS, UserError, atomic_write, printable

SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "publictest": "val", "test": "test", "testing": "test",
                 "privatetest": "test"}
CLASS_FOLDERS = {"anger": "Angry", "angry": "Angry", "disgust": "Disgust", "disgusted": "Disgust",
                 "fear": "Fear", "fearful": "Fear", "happiness": "Happy", "happy": "Happy",
                 "sad": "Sad", "sadness": "Sad", "surprise": "Surprise", "surprised": "Surprise",
                 "neutral": "Neutral"}
SPLIT_CODES = {name: dataset.USAGES.index(usage) for name, usage in SPLITS.items()}  # usage codes
SPLITS_BY_CODE = sorted(SPLIT_CODES, key=SPLIT_CODES.get)
HELD_OUT = 0.1  # of each class, for each split the folder does not have (val, test)
SALT = b"fer-folders-1"  # the split's seed: change it and every held-out split changes
SMALL_FACE = 100  # --faces auto: images at most this many pixels across are cropped faces already
SIZE_SAMPLE = 64  # images whose size decides --faces auto
CACHE_VERSION = 2
SPLIT_FILE, LEFT_OUT_FILE = "split.csv", "left_out.csv"
NO_FACE = "no face found (--faces detect)"
NOT_IMAGE = "not an image file (no image extension OpenCV reads)"
OUTSIDE = "not inside a class folder"
SHOWN = 3  # files named in a message; the others are counted


def _hidden(name):
    return name.startswith(".") or name == "__MACOSX"  # .DS_Store, ._* and macOS zip leftovers


def _entries(folder, root, skipped):
    """(sub-folder names, file names) of a folder, sorted, hidden ones left out."""
    try:
        with os.scandir(folder) as it:
            found = [(e.name, e.is_dir()) for e in it if not _hidden(e.name)]
    except OSError as err:
        if folder == root:
            raise UserError(f"cannot read the folder {printable(root)}: {err.strerror or err}") from err
        skipped.append((os.path.relpath(folder, root), f"is a folder that cannot be read ({err.strerror})"))
        return [], []
    return sorted(n for n, d in found if d), sorted(n for n, d in found if not d)


def _identity(folder):
    stat = os.stat(folder)
    return stat.st_dev, stat.st_ino


def _walk(top, root, skipped, above):
    """The files under `top`, as paths relative to `root`, following symbolic links but into no
    folder twice and into none of the folders `above` it ({_identity}), so a loop of links ends
    instead of running on."""
    files, seen = [], set(above)
    for folder, dirs, names in os.walk(top, followlinks=True, onerror=lambda err: skipped.append(
            (os.path.relpath(err.filename, root), f"is a folder that cannot be read ({err.strerror})"))):
        if _identity(folder) in seen:
            skipped.append((os.path.relpath(folder, root), "is a link back to a folder already read "
                                                           "(a loop of symbolic links): passed over"))
            dirs[:] = []
            continue
        seen.add(_identity(folder))
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        prefix = os.path.join(os.path.relpath(folder, root), "")  # once per folder: 30,000 relpaths take 1 s
        files += [prefix + n for n in sorted(names) if not _hidden(n)]
    return files


def scan(root):
    """Every image file of a folder: ([(relative path, split key or None, class folder)] sorted
    by path, [(relative path, why it is left out)], the split folders found {key: name})."""
    skipped = []
    dirs, loose = _entries(root, root, skipped)
    splits = {}
    for name in dirs:
        key = SPLIT_FOLDERS.get(name.lower())
        if key in splits:
            raise UserError(f"{printable(root)} has two folders for the {key} split, {printable(splits[key])} "
                            f"and {printable(name)}: merge them or remove one")
        if key:
            splits[key] = name
    if splits:  # (in the other layout the loop below finds the loose files)
        skipped += [(name, OUTSIDE) for name in loose]
        skipped += [(name, "is not a split folder (train, val, test, ...): passed over")
                    for name in dirs if name not in splits.values()]
    images = []
    for key, folder in (splits.items() if splits else [(None, "")]):
        top = os.path.join(root, folder)
        classes, loose = _entries(top, root, skipped)
        skipped += [(os.path.join(folder, name), OUTSIDE) for name in loose]
        above = {_identity(root), _identity(top)}
        for name in classes:
            found = _walk(os.path.join(top, name), root, skipped, above)
            is_image = [path.lower().endswith(faces.READ_EXTENSIONS) for path in found]
            images += [(path, key, name) for path, image in zip(found, is_image) if image]
            skipped += [(path, NOT_IMAGE) for path, image in zip(found, is_image) if not image]
            if not any(is_image):
                skipped.append((os.path.join(folder, name), "is a class folder with no images"))
    return sorted(images), skipped, splits


def class_name(folder):
    """Our name for a class folder: FER2013's for its common spellings (any case, after an
    optional number such as `3_`), else the folder's own name, made printable and safe to put in
    a file name."""
    key = re.sub(r"^\d+[ _.-]+", "", folder.strip().lower())
    if key in CLASS_FOLDERS:
        return CLASS_FOLDERS[key]
    name = os.fsencode(folder).decode("utf-8", "replace")
    return re.sub(r"[\\\x00-\x1f\x7f]", "_", name).strip().lstrip(".")[:MAX_CLASS_NAME] or "_"


def ordered_classes(names):
    """FER2013's classes first, in its order (so its models fit), then the others by name."""
    names = set(names)
    return tuple([e for e in EMOTIONS if e in names] + sorted(names - set(EMOTIONS), key=str.lower))


def held_out_usage(files, labels, usage, parts):
    """Give each class's files with usage train a split from `parts` (val, test codes): ordered by a
    salted hash of their path, the first tenth goes to the first part, the next to the second.
    Returns the new usage codes."""
    train = SPLIT_CODES["train"]
    usage = usage.copy()
    keys = np.array([int.from_bytes(hashlib.sha1(SALT + os.fsencode(f)).digest()[:8], "big")
                     for f in files], np.uint64)
    for label in np.unique(labels):
        members = np.flatnonzero((labels == label) & (usage == train))
        members = members[np.argsort(keys[members], kind="stable")]
        k = int(HELD_OUT * len(members) + 0.5) or int(len(members) > len(parts))
        for j, code in enumerate(parts):
            usage[members[j * k:(j + 1) * k]] = code
    return usage


def choose_faces(root, files, how, log):
    """--faces auto: `whole` when the images are small (cropped faces already), else `detect`;
    decided from the sizes of a sample of them (their headers only), and said."""
    if how != "auto":
        return how
    from PIL import Image
    sides = []
    for path in files[::max(1, len(files) // SIZE_SAMPLE)][:SIZE_SAMPLE]:
        try:
            with Image.open(os.path.join(root, path)) as image:
                sides.append(max(image.size))
        except Exception:  # not readable: decoding says why
            continue
    side = int(np.median(sides)) if sides else 0
    if side <= SMALL_FACE:
        log(f"faces: whole images (typically {side} px across: already-cropped faces; "
            "--faces detect to search them for faces instead)")
        return "whole"
    log(f"faces: detect (images typically {side} px across: the largest face found in each is "
        "cropped, as --images does; --faces whole to take each image as a face)")
    return "detect"


def face_of(path, detector=None):
    """One image's 48x48 grey face: the whole image, or with a detector (faces.DETECTORS) the
    largest face it finds, with the detector's margin (as --images crops). Raises faces.Skipped."""
    image, _, _ = faces.read_image(path)
    grey = faces.grey_of(image)
    if detector is None:
        return faces.crop_face(grey, (0, 0, grey.shape[1], grey.shape[0]), 0.0)
    boxes = detector.detect(image)
    if not boxes:
        raise faces.Skipped(NO_FACE)
    return faces.crop_face(grey, max(boxes, key=lambda box: box[2] * box[3]), detector.margin)


def decode(root, files, how):
    """Every file's face (`how`: whole or detect, as --faces): {"faces": (N, 48, 48) uint8 of the
    files that gave one, "kept": their indices, "left": indices of the others, "why": the
    reasons}. In one thread: on the 2-core dev VM a pool of two decoded small JPEGs slower than
    one thread (README "Your own data")."""
    from tqdm import tqdm
    detector = faces.face_detector("haar") if how == "detect" else None
    out = np.zeros((len(files), SIDE, SIDE), np.uint8)
    left = {}
    for i, path in enumerate(tqdm(files, desc="decoding", unit="image", leave=False, disable=None)):
        try:
            out[i] = face_of(os.path.join(root, path), detector)
        except faces.Skipped as why:
            left[i] = str(why)
    kept = np.array([i for i in range(len(files)) if i not in left], np.int64)
    return {"faces": out[kept], "kept": kept, "left": np.array(list(left), np.int64),
            "why": np.array(list(left.values()), str)}


def cache_path(root, files, how):
    """The cache file of a folder's faces: named after the folder and keyed on each file's path,
    size and modification time (not on where the folder is: a moved folder keeps its cache)."""
    key = hashlib.sha1(f"{CACHE_VERSION}|{how}\n".encode())
    prefix = os.path.join(root, "")
    for path in files:
        try:
            stat = os.stat(prefix + path)
            stamp = f"{stat.st_size}|{stat.st_mtime_ns}"
        except OSError:
            stamp = "unreadable"
        key.update(os.fsencode(path) + b"\0" + stamp.encode() + b"\n")
    name = re.sub(r"[^\w.-]", "_", printable(os.path.basename(os.path.abspath(root))))[:40]
    return os.path.join(dataset.default_cache_dir(), f"{name}-folder-{key.hexdigest()[:16]}.npz")


def load_faces(root, files, how, log):
    """decode()'s arrays, from the cache when the files have not changed since."""
    cached = cache_path(root, files, how)
    arrays = dataset.read_cache(cached, log)
    if arrays is not None:
        return arrays
    log(f"decoding {len(files):,} images of {printable(root)} (once: the faces are cached in {cached})")
    started = time.perf_counter()
    arrays = decode(root, files, how)
    # Hashing the pixels takes longer than reading them from the cache: once, kept with them.
    arrays["faces_sha256"] = np.array(hashlib.sha256(arrays["faces"].tobytes()).hexdigest())
    seconds = time.perf_counter() - started
    log(f"decoded {len(files):,} images in {seconds:.1f} s ({len(files) / max(seconds, 1e-9):,.0f} images/s)")
    dataset.write_cache(cached, arrays, log)
    return arrays


def fingerprint(data, faces_sha256):
    """sha256 of what a model learns and is judged on: the classes, each face's file, split and
    label, and the faces themselves (their sha256)."""
    digest = hashlib.sha256(json.dumps([list(data.class_names), str(faces_sha256)]).encode())
    for part in (data.usage, data.labels):
        digest.update(np.ascontiguousarray(part).tobytes())
    digest.update(b"\0".join(os.fsencode(f) for f in data.files))
    return digest.hexdigest()


def describe_left_out(skipped, total):
    """One line: how many files were left out and why, grouped, with a few named."""
    if not skipped:
        return None
    why = Counter(re.sub(r"^is (an? )?", "", reason) for _, reason in skipped)
    groups = "; ".join(f"{n} {reason}" for reason, n in why.most_common(4))
    more = f"; {len(why) - 4} other reasons" if len(why) > 4 else ""
    named = ", ".join(printable(path) for path, _ in skipped[:SHOWN])
    return f"left out {len(skipped):,} of {total:,} files ({groups}{more}), e.g. {named}"


def describe_layout(root, splits, usage):
    """What the folder's layout is and where each split comes from, in one line."""
    if not splits:
        return (f"{printable(root)}: class folders, no split folders: split 80/10/10 per class "
                "(stratified and seeded: the same split every time)")
    found = ", ".join(f"{printable(name)}/ ({key})" for key, name in splits.items())
    made = [key for key in ("val", "test") if key not in splits and (usage == SPLIT_CODES[key]).any()]
    held = (f"; no {' or '.join(made)} folder: a stratified tenth of train is held out for "
            f"{'each' if len(made) > 1 else 'it'} (seeded: the same every time)") if made else ""
    return f"{printable(root)}: split folders {found}{held}"


def label_faces(images, splits):
    """(class names, label per face, usage per face) of the decoded faces; `images` holds their
    (path, split key, class folder)."""
    name_of = {folder: class_name(folder) for folder in {folder for _, _, folder in images}}
    classes = ordered_classes(name_of.values())
    label_of = {folder: classes.index(name) for folder, name in name_of.items()}
    labels = np.array([label_of[folder] for _, _, folder in images], np.int64)
    usage = np.array([SPLIT_CODES[key or "train"] for _, key, _ in images], np.int8)
    parts = [SPLIT_CODES[key] for key in ("val", "test") if key not in splits]
    if parts:  # the splits the folder does not have are held out of train
        usage = held_out_usage([path for path, _, _ in images], labels, usage, parts)
    return classes, labels, usage


def describe_classes(images, classes):
    """The classes and the folders each one comes from (unknown classes are said to be new)."""
    found = {folder for _, _, folder in images}
    folders = {name: sorted(folder for folder in found if class_name(folder) == name) for name in classes}
    return f"{len(classes)} class{'es' if len(classes) > 1 else ''}: " + ", ".join(
        f"{name}" + (f" (from {', '.join(map(printable, folders[name]))})"
                     if folders[name] != [name] else "") +
        ("" if name in EMOTIONS else " (not one of FER2013's: a class of its own)")
        for name in classes)


def load_folder(root, faces="auto", log=print, training=False):
    """A folder of face images as a dataset.FerData (layouts and class names: the module's
    docstring). Files that give no face are left out, counted and kept in data.skipped;
    `training`: also check what training needs (a train split, two classes, ...)."""
    root = os.path.normpath(root)
    images, skipped, splits = scan(root)
    if not images:
        raise UserError(f"{printable(root)} holds no images in class folders: put each class's images "
                        "in a folder named after it, DIR/<class>/*.jpg or DIR/<split>/<class>/*.jpg"
                        + (f" ({describe_left_out(skipped, len(skipped))})" if skipped else ""))
    files = [path for path, _, _ in images]
    total = len(files) + len(skipped)  # every file looked at
    faces = choose_faces(root, files, faces, log)
    arrays = load_faces(root, files, faces, log)
    skipped += [(files[i], str(why)) for i, why in zip(arrays["left"], arrays["why"])]
    kept = [images[i] for i in arrays["kept"]]
    if not kept:
        raise UserError(f"none of the {len(files):,} images of {printable(root)} gave a face "
                        f"({describe_left_out(skipped, total)})")
    classes, labels, usage = label_faces(kept, splits)
    data = dataset.FerData(arrays["faces"], labels, usage, root, classes,
                           files=[path for path, _, _ in kept], faces=faces, skipped=skipped)
    data.fingerprint = fingerprint(data, arrays["faces_sha256"])
    log(describe_layout(root, splits, usage))
    log(describe_classes(kept, classes))
    empty = sorted({folder for _, _, folder in images} - {folder for _, _, folder in kept})
    if empty:
        log(f"note: no face from the class folder(s) {', '.join(map(printable, empty))}: left out")
    if skipped:  # write_split lists them: run.py and infer.py -d call it on their output folders
        log(f"note: {describe_left_out(skipped, total)}; run.py and infer.py list them all in "
            f"{LEFT_OUT_FILE} in their output folder")
    if training:
        check_trainable(data, splits)
    return data


def check_trainable(data, splits):
    """What run.py needs of a folder, as one clear error each."""
    where = printable(data.source)
    counts = {name: np.bincount(data.labels[data.usage == SPLIT_CODES[name]],
                                minlength=len(data.class_names)) for name in SPLITS}
    if not counts["train"].any():
        raise UserError(f"{where} has split folders ({', '.join(map(printable, splits.values()))}) but "
                        "no faces to train on: add a train/ folder (or use class folders only)")
    learnt = [n for n, c in zip(data.class_names, counts["train"]) if c]
    if len(learnt) < 2:
        raise UserError(f"{where} has training faces of one class only ({learnt[0]}): a classifier "
                        "needs two classes or more")
    for name in ("val", "test"):
        unseen = [n for n, c, t in zip(data.class_names, counts[name], counts["train"]) if c and not t]
        if unseen:
            raise UserError(f"the {name} split of {where} has faces of {', '.join(unseen)}, which the "
                            "train split lacks: a model cannot learn a class it never sees; add "
                            "training images of it, or remove it")
        if not counts[name].any():
            raise UserError(f"{where} has too few images for a {name} split: a class needs 3 images "
                            "or more for one of them to be held out")


def write_split(data, folder):
    """split.csv (split, class, file: the faces of each split, in the order a report on that split
    numbers them, except that it skips faces of classes its model lacks: predictions.csv's `file` says)
    and left_out.csv (file, why) into `folder`; nothing for a CSV data set. File names are
    written as their bytes, whatever their encoding."""
    if data.files is None:
        return
    rows = [(name, data.class_names[data.labels[i]], data.files[i])
            for name in SPLITS for i in np.flatnonzero(data.usage == SPLIT_CODES[name])]
    _write_csv(os.path.join(folder, SPLIT_FILE), ("split", "class", "file"), rows)
    _write_csv(os.path.join(folder, LEFT_OUT_FILE), ("file", "why"), data.skipped)


def _write_csv(path, header, rows):
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode("utf-8", "surrogateescape")))


def read_split(path):
    """{file: (split, class)} of a split.csv, or None when there is none."""
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            return {row["file"]: (row["split"], row["class"]) for row in csv.DictReader(f)}
    except (OSError, KeyError, csv.Error):
        return None


def changes(data, saved_fingerprint, split_file):
    """None when `data` holds the faces that made `saved_fingerprint`; else a sentence that names
    the folder and, from the earlier split.csv when it is there, what changed in it."""
    if saved_fingerprint is None or data.fingerprint == saved_fingerprint:
        return None
    where = f"{printable(data.source)} is not the folder it was (its files, splits or faces changed)"
    before = read_split(split_file)
    if before is None:
        return where
    now = {f: (name, data.class_names[label]) for f, name, label in
           zip(data.files, np.array(SPLITS_BY_CODE)[data.usage], data.labels)}
    differ = [("gone", sorted(set(before) - set(now))), ("new", sorted(set(now) - set(before))),
              ("in another split or class", sorted(f for f in set(now) & set(before) if now[f] != before[f]))]
    said = [f"{len(paths)} {what} ({', '.join(printable(p) for p in paths[:SHOWN])}"
            f"{', ...' if len(paths) > SHOWN else ''})" for what, paths in differ if paths]
    return (f"{where}: " + "; ".join(said) if said else
            f"{where}: the same files, but other faces (images edited, or another --faces)")


def changes_since_training(data, ckpt, ckpt_path):
    """changes() for a report (infer.py -d): when `data` is the folder the checkpoint was trained on, but its
    faces are not the ones of the training run."""
    trained = ckpt.get("dataset")
    if not trained or not os.path.isdir(trained) or not os.path.samefile(trained, data.source):
        return None  # another folder: a cross-dataset evaluation
    return changes(data, ckpt.get("args", {}).get("data_sha256"),
                   os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), SPLIT_FILE))
