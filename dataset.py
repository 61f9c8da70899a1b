"""FER2013 in the Kaggle CSV layout: parsed once, vectorised, cached as uint8 arrays.

    python3 dataset.py -d ../shared/data/fer2013.csv.gz   # rows, splits and the class table
    python3 dataset.py -d synthetic                         # the built-in synthetic faces
    python3 dataset.py -d my_faces/                         # a folder of images (folders.py)

The CSV has a header `emotion,pixels,Usage` (the competition's icml_face_data.csv writes
` Usage` and ` pixels`), one face per row: a label 0-6, 2304 space-separated grey levels of a
48x48 face, and the split. Plain, .gz, .xz and .zip files are read. The decoded arrays are cached
(keyed on the file's path, size and modification time), so only the first start pays the parse.
"""
import hashlib
import io
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from utils import (DEFAULT_CSV, EMOTIONS, NUM_CLASSES, SIDE, SPLITS, DiskFull, Parser, UserError, atomic_write,
                   clip, flag, path_arg, printable, save_figure)

USAGES = tuple(SPLITS.values())
PIXELS = SIDE * SIDE
SYNTHETIC_CSV = "./data/synthetic.csv"
CACHE_VERSION = 1
# Why a row is bad, by code; 0 means good.
BAD_REASONS = {1: f"has {{n}} pixel values instead of {PIXELS}",
               2: "has pixels that are not whole numbers in 0-255",
               3: "has an emotion label outside 0-6",
               4: "has an unknown Usage (not Training, PublicTest or PrivateTest)"}
WHERE_TO_GET = ("FER2013 comes from the Kaggle challenge 'Challenges in Representation Learning: "
                "Facial Expression Recognition' (fer2013.csv, or icml_face_data.csv); put it at "
                f"{DEFAULT_CSV} or pass its path with -d. To try the tool without it, use the "
                "built-in synthetic faces: -d synthetic.")


@dataclass
class FerData:
    """All faces of one CSV or folder: images (N, 48, 48) uint8, labels (N,) int64 (index into
    class_names), usage (N,) int8 (index into USAGES: train, val, test).

    A folder of images (folders.py) also has `files` (each face's path in the folder), `faces`
    (how faces were taken: whole or detect), `fingerprint` (sha256 of its split, classes and
    faces) and `skipped` ([(path, why)]: files left out); a CSV has None there."""
    images: np.ndarray
    labels: np.ndarray
    usage: np.ndarray
    source: str
    class_names: tuple = EMOTIONS
    files: list | None = None
    faces: str | None = None
    fingerprint: str | None = None
    skipped: list = field(default_factory=list)

    @property
    def split_names(self):
        """What the splits are called: FER2013's Usage values, or train/val/test for a folder."""
        return USAGES if self.files is None else tuple(SPLITS)

    def mask(self, name):
        """Which faces are in split 'train' | 'val' | 'test' | 'all'."""
        return np.ones(len(self.labels), bool) if name == "all" else self.usage == USAGES.index(SPLITS[name])

    def split(self, name):
        """(images, labels) of split 'train' | 'val' | 'test' | 'all'; an empty split is a UserError."""
        mask = self.mask(name)
        if mask.all():  # no copy of all the pixels
            return self.images, self.labels
        if mask.any():
            return self.images[mask], self.labels[mask]
        if self.files is not None:
            raise UserError(f"{self.source} has no faces in its '{name}' split (python3 dataset.py "
                            "-d FOLDER shows its splits; --split all takes every face)")
        raise UserError(f"{self.source} has no {SPLITS[name]} rows, so the '{name}' split is "
                        "empty; the tool needs Training, PublicTest and PrivateTest rows.")


class Batches:
    """Serves batches of one split, (the faces' indices in the split, uint8 images (B, 1, 48, 48),
    labels), as index slices of a per-epoch permutation, on `device`.

    The whole split lives in one uint8 tensor, on the GPU when training there (it fits on any):
    no per-sample work, no worker processes. Under DistributedDataParallel each rank takes a
    disjoint shard of every epoch's permutation, and all ranks get the same number of batches."""

    def __init__(self, images, labels, batch_size, device="cpu", seed=0, shuffle=True, rank=0, world=1):
        self.device = torch.device(device)
        where = self.device if self.device.type == "cuda" else "cpu"
        self.images = torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).to(where)
        self.labels = torch.from_numpy(np.ascontiguousarray(labels)).long().to(where)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world = rank, world

    def __len__(self):
        return math.ceil(len(self.labels) / (self.batch_size * self.world))

    def epoch_indices(self, epoch):
        """This rank's indices for an epoch, split into len(self) batches."""
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        else:
            order = torch.arange(n)
        shard = order[self.rank::self.world]
        return torch.tensor_split(shard, len(self))

    def epoch(self, epoch, start=0, stop=None):
        """Yield (batch index, the faces' indices in the split, images, labels) of batches
        start..stop-1 (to resume mid-epoch)."""
        for i, idx in enumerate(self.epoch_indices(epoch)[start:stop], start):
            idx = idx.to(self.labels.device)
            yield (i, idx.to(self.device, non_blocking=True), self.images[idx].to(self.device, non_blocking=True),
                   self.labels[idx].to(self.device, non_blocking=True))


def fold_of(n, folds):
    """The fold (0 .. folds - 1) of each of n training faces: a fixed shuffle, the same for every
    run and seed, so that a teacher trained without one fold (run.py --hold_out) and a student
    distilled from it agree on which faces the teacher never saw (folds_sha256 checks it)."""
    return np.random.default_rng(2026).permutation(n) % folds


def csv_sha256(data):
    """The fingerprint of a CSV data set's faces, labels and splits (a folder's is
    folders.fingerprint): a resumed run must find the faces it started with, not merely as many
    of each class. About 0.2 s for FER2013."""
    digest = hashlib.sha256()
    for array in (data.images, data.labels, data.usage):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def folds_sha256(images, labels, folds):
    """The fingerprint of a training split's faces, labels and their folds: the same for a
    teacher and its student only if both split the same faces, in the same order, the same way
    (numpy does not promise the same shuffle in every version)."""
    digest = hashlib.sha256()
    for array in (images, labels, fold_of(len(labels), folds)):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def resolve_path(path):
    """`synthetic` names the built-in data set (drawn once, then reused); anything else is a path."""
    if path == "synthetic":
        if not os.path.exists(SYNTHETIC_CSV):
            import synthetic
            print(f"drawing the built-in synthetic faces into {SYNTHETIC_CSV}")
            synthetic.write_synthetic_csv(SYNTHETIC_CSV)
        return SYNTHETIC_CSV
    if not os.path.exists(path):
        raise UserError(f"no dataset at {path}. {WHERE_TO_GET}")
    return path


def _parse_pixel_rows(rows):
    """Decode a list of pixel strings: (values int16 of every token, tokens per row, bad row mask).

    Vectorised over the bytes of all rows at once: a token ends at each separator, its value is
    read from its last three digits. Runs in threads: numpy releases the GIL, so both cores work."""
    lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    text = np.frombuffer((" ".join(rows) + " ").encode("latin-1", "replace"), np.uint8)
    sep = text == 32
    ends = np.flatnonzero(sep)
    tokens_per_row = np.add.reduceat(sep, starts).astype(np.int64)
    token_len = np.diff(ends, prepend=-1) - 1
    digits = text.astype(np.int16) - 48
    values = digits[ends - 1].copy()
    two = token_len >= 2
    values[two] += 10 * digits[ends[two] - 2]
    three = token_len >= 3
    values[three] += 100 * digits[ends[three] - 3]
    bad = (lengths == 0) | (tokens_per_row != PIXELS)
    stray = np.flatnonzero(~sep & ((text < 48) | (text > 57)))  # anything but digits and spaces
    token_row = np.repeat(np.arange(len(rows)), tokens_per_row)
    odd = (token_len == 0) | (token_len > 3) | (values > 255)
    bad[np.searchsorted(starts, stray, side="right") - 1] = True
    bad[token_row[odd]] = True
    return values, tokens_per_row, bad


def _decode_pixels(pixel_strings, chunk=512):
    """All rows -> (images (N, 48, 48) uint8 with zeros for bad rows, values per row, bad mask)."""
    chunks = [pixel_strings[i:i + chunk] for i in range(0, len(pixel_strings), chunk)]
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        parts = list(pool.map(_parse_pixel_rows, chunks))
    images = np.zeros((len(pixel_strings), SIDE, SIDE), np.uint8)
    tokens = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    bad = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, bool)
    row = 0
    for values, per_row, bad_rows in parts:
        good = ~bad_rows
        if good.all():
            images[row:row + len(per_row)] = values.reshape(-1, SIDE, SIDE)
        else:
            offsets = np.concatenate([[0], np.cumsum(per_row)[:-1]])[good]
            gathered = values[offsets[:, None] + np.arange(PIXELS)]
            images[row + np.flatnonzero(good)] = gathered.reshape(-1, SIDE, SIDE)
        row += len(per_row)
    tokens[np.fromiter((not r for r in pixel_strings), bool, len(pixel_strings))] = 0
    return images, tokens, bad


def _read_table(path):
    import gzip
    import lzma
    import zipfile
    import zlib
    import pandas as pd
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, compression="infer")
    except (zlib.error, lzma.LZMAError, zipfile.BadZipFile, gzip.BadGzipFile, EOFError) as err:
        raise UserError(f"{path} is damaged: it could not be decompressed ({type(err).__name__}: "
                        f"{clip(err, 200)}); copy or download it again.") from err
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, ValueError,
            OSError) as err:
        raise UserError(f"{path} could not be read as a CSV ({type(err).__name__}: "
                        f"{clip(err, 200)}). {WHERE_TO_GET}") from err
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in ("emotion", "pixels", "Usage") if c not in table.columns]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)}; a FER2013 CSV has the "
                        f"header emotion,pixels,Usage (found: {clip(', '.join(table.columns), 200)}).")
    return table


def decode_csv(path):
    """Parse the whole CSV: a dict of arrays, with a reason code per row (0 = good)."""
    import pandas as pd
    table = _read_table(path)
    images, tokens, bad_pixels = _decode_pixels(table["pixels"].tolist())
    labels = pd.to_numeric(table["emotion"].str.strip(), errors="coerce").to_numpy(np.float64)
    good_label = np.isin(labels, np.arange(NUM_CLASSES))
    usage_text = table["Usage"].str.strip()
    usage = np.full(len(table), -1, np.int8)
    for code, name in enumerate(USAGES):
        usage[(usage_text == name).to_numpy()] = code
    reason = np.zeros(len(table), np.int8)
    # The first matching reason wins, most basic first.
    reason[usage < 0] = 4
    reason[~good_label] = 3
    reason[bad_pixels & (tokens == PIXELS)] = 2
    reason[bad_pixels & (tokens != PIXELS)] = 1
    return {"images": images, "labels": np.where(good_label, labels, -1).astype(np.int64),
            "usage": usage, "reason": reason, "tokens": tokens}


def default_cache_dir():
    return os.environ.get("FER_CACHE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                        "data", "cache"))


def cache_path(path, cache_dir):
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{CACHE_VERSION}"
    digest = hashlib.sha1(os.fsencode(key)).hexdigest()[:16]  # any name, UTF-8 or not
    name = printable(os.path.basename(path).split(".")[0])
    return os.path.join(cache_dir, f"{name}-{digest}.npz")


def read_cache(cached, log):
    """The arrays of a cache file, or None when there is none (or it cannot be read)."""
    if cached and os.path.exists(cached):
        try:
            with np.load(cached) as arrays:
                return {k: arrays[k] for k in arrays.files}
        except (OSError, ValueError, KeyError):
            log(f"warning: ignoring the unreadable cache {cached}")
    return None


def write_cache(cached, arrays, log):
    """Save decoded arrays (uncompressed: loading them is then a copy); a read-only place only
    costs speed, so it is a warning."""
    try:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write(cached, lambda f: f.write(buffer.getbuffer()))
    except (OSError, DiskFull) as err:  # a read-only or full place only costs speed
        log(f"warning: could not cache the decoded data in {os.path.dirname(cached)}: {err}")


def _load_or_decode(path, cache_dir, log):
    cached = cache_path(path, cache_dir) if cache_dir else None
    arrays = read_cache(cached, log)
    if arrays is None:
        arrays = decode_csv(path)
        if cached:
            write_cache(cached, arrays, log)
    return arrays


def describe_bad_rows(reason, tokens, source, shown=5):
    lines = np.flatnonzero(reason)
    details = []
    for row in lines[:shown]:
        text = BAD_REASONS[int(reason[row])].format(n=int(tokens[row]))
        details.append(f"line {row + 2} {text}")  # +2: the header, and lines count from 1
    more = f" and {len(lines) - shown} more" if len(lines) > shown else ""
    return (f"{source}: {len(lines)} of {len(reason)} rows are bad: "
            f"{'; '.join(details)}{more}.")


def load_fer2013(path, skip_bad_rows=False, cache_dir="default", log=print):
    """Read a FER2013 CSV (or `synthetic`) into a FerData; bad rows are a UserError unless
    skip_bad_rows, which drops them with a warning that counts them."""
    path = resolve_path(path)
    arrays = _load_or_decode(path, default_cache_dir() if cache_dir == "default" else cache_dir, log)
    reason = arrays["reason"]
    if reason.any():
        message = describe_bad_rows(reason, arrays["tokens"], path)
        if not skip_bad_rows:
            raise UserError(f"{message} Fix the file, or pass --skip-bad-rows to drop them.")
        log(f"warning: {message} Dropped them (--skip-bad-rows).")
    good = reason == 0
    if not good.any():
        raise UserError(f"{path} has no usable rows.")
    keep = slice(None) if good.all() else good  # a clean file: no copy of its 80 MB of pixels
    return FerData(arrays["images"][keep], arrays["labels"][keep], arrays["usage"][keep], path)


def load_data(path, skip_bad_rows=False, faces="auto", log=print, training=False):
    """-d: a folder of images (folders.load_folder; `training` asks for what training needs) or
    a FER2013 CSV (load_fer2013), as a FerData."""
    if os.path.isdir(path):
        import folders
        return folders.load_folder(path, faces, log, training)
    if faces not in (None, "auto"):
        raise UserError(f"--faces {faces} applies to folders of images; {path} is a CSV of faces")
    return load_fer2013(path, skip_bad_rows, log=log)


def class_counts(data):
    """{split name: counts per class}, for the splits present."""
    return {name: np.bincount(data.labels[data.usage == code], minlength=len(data.class_names))
            for code, name in enumerate(data.split_names) if (data.usage == code).any()}


def class_table(counts, class_names=EMOTIONS):
    head = "| split | faces | " + " | ".join(class_names) + " |"
    rows = [head, "|---" * (len(class_names) + 2) + "|"]
    for split, c in counts.items():
        rows.append(f"| {split} | {c.sum()} | " + " | ".join(str(int(v)) for v in c) + " |")
    return "\n".join(rows)


def plot_class_distribution(counts, path, class_names=EMOTIONS):
    """Grouped bar chart of faces per class and split, saved as PNG (matplotlib's object API:
    no pyplot state, no GUI backend, nothing to close)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(max(8, len(class_names)), 4))
    ax = fig.subplots()
    width = 0.8 / max(1, len(counts))
    for i, (split, c) in enumerate(counts.items()):
        ax.bar(np.arange(len(class_names)) + i * width, c, width, label=split)
    ax.set_xticks(np.arange(len(class_names)) + width * (len(counts) - 1) / 2, class_names)
    ax.set_ylabel("faces")
    ax.set_title("Class distribution")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_figure(fig, path)


def faces_flag(group):
    """--faces, the same for run.py, infer.py and this checker."""
    flag(group, "--faces", choices=("auto", "detect", "whole"), default="auto",
         help="with a folder of images: detect crops the largest face of each image (OpenCV's "
              "detector, as --images does; images without one are left out and listed), whole "
              "takes each image as a face; auto: whole when the images are small (at most "
              "100 px across: already-cropped faces), else detect (default: auto)")


def main(argv):
    parser = Parser(prog="dataset.py", description="Check a data set (a FER2013 CSV, or a folder of "
                                                   "face images): its splits and classes.")
    flag(parser, "-d", "--dataset", type=path_arg, default=DEFAULT_CSV,
         help="CSV path, 'synthetic', or a folder of images: DIR/<class>/* or "
              "DIR/<split>/<class>/* (default: %(default)s)")
    flag(parser, "--chart", type=path_arg, metavar="PNG", help="also draw the class distribution into this file")
    flag(parser, "--skip_bad_rows", action="store_true",
         help="drop malformed rows (with a warning that counts them)")
    faces_flag(parser)
    flag(parser, "--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    data = load_data(args.dataset, args.skip_bad_rows, args.faces)
    counts = class_counts(data)
    print(class_table(counts, data.class_names))
    missing = [name for name in data.split_names if name not in counts]
    if missing:
        print(f"warning: {data.source} has no {' and no '.join(missing)} " +
              ("faces: run.py needs a train split" if data.files is not None else
               "rows: run.py needs Training, PublicTest and PrivateTest"), file=sys.stderr)
    if args.chart:
        plot_class_distribution(counts, args.chart, data.class_names)
        print(f"chart: {args.chart}")
    return 1 if missing else 0


if __name__ == "__main__":
    from utils import run_cli
    sys.exit(run_cli(main))
