"""Developer benchmark (not part of the product): reading a folder of face images (folders.py),
on FER2013 exported into the image-folder layout.

    python3 tools/bench_folders.py --csv ../shared/data/fer2013.csv.gz --folder /tmp/fer2013_folders

The CSV is exported once as DIR/<Usage>/<class>/<Usage>_<row>.jpg (the Usage folders are split
spellings folders.py knows, so the folder's splits are the CSV's). Then: the first decode of the
folder into an empty cache folder, the cached load (median of --repeats), the same two for the
CSV for reference, and a check that the folder gives the CSV's faces: the same rows, labels and
splits, pixels within JPEG rounding (equal with --ext .png). The table is printed and written,
with the CPU, to --out. The exported folder is FER2013: keep it out of the repository.
"""
import argparse
import os
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.common import ROOT, machine_info  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

import dataset  # noqa: E402
import folders  # noqa: E402
from utils import EMOTIONS, save_json  # noqa: E402


def export_csv(csv, root, ext=".jpg"):
    """Write every face of a FER2013 CSV as root/<Usage>/<class>/<Usage>_<row><ext> (the
    layout of FER2013's image-folder release, with its row number); returns the number written."""
    data = dataset.load_fer2013(csv, log=lambda *a: None)
    for usage in dataset.USAGES:
        for name in EMOTIONS:
            os.makedirs(os.path.join(root, usage, name.lower()), exist_ok=True)
    for row, (face, label, usage) in enumerate(zip(data.images, data.labels, data.usage)):
        usage = dataset.USAGES[usage]
        path = os.path.join(root, usage, EMOTIONS[label].lower(), f"{usage}_{row:05d}{ext}")
        if not cv2.imwrite(path, face):
            raise OSError(f"could not write {path}")
    return len(data.labels)


def compare(csv_data, folder_data):
    """How the folder's faces match the CSV's rows they were written from (the row is in each
    file's name)."""
    rows = np.array([int(re.search(r"_(\d+)\.\w+$", f).group(1)) for f in folder_data.files])
    labels = np.array([EMOTIONS.index(folder_data.class_names[k]) for k in folder_data.labels])
    diff = np.abs(csv_data.images[rows].astype(np.int16) - folder_data.images)
    return {"faces": len(rows), "every_row": sorted(rows.tolist()) == list(range(len(csv_data.labels))),
            "labels_equal": bool((labels == csv_data.labels[rows]).all()),
            "splits_equal": bool((folder_data.usage == csv_data.usage[rows]).all()),
            "max_abs_diff": int(diff.max()), "mean_abs_diff": round(float(diff.mean()), 4),
            "equal_pixels": round(float((diff == 0).mean()), 4)}


def timed(load, repeats=1):
    """(median seconds of `repeats` calls, what the last call returned)."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = load()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def measure(csv, folder, repeats):
    """{what: (seconds, images)}, and the two data sets, each decoded into an empty cache first."""
    quiet = lambda *a: None  # noqa: E731
    rows = {}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["FER_CACHE_DIR"] = cache
        rows["folder: first decode"] = timed(lambda: folders.load_folder(folder, log=quiet))
        rows["folder: cached load"] = timed(lambda: folders.load_folder(folder, log=quiet), repeats)
        rows["CSV: first parse"] = timed(lambda: dataset.load_fer2013(csv, log=quiet))
        rows["CSV: cached load"] = timed(lambda: dataset.load_fer2013(csv, log=quiet), repeats)
    folder_data, csv_data = rows["folder: cached load"][1], rows["CSV: cached load"][1]
    return {k: (s, len(data.labels)) for k, (s, data) in rows.items()}, csv_data, folder_data


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", required=True, help="a FER2013 CSV (../shared/data/fer2013.csv.gz)")
    p.add_argument("--folder", required=True, help="where to export it (outside the repository)")
    p.add_argument("--ext", default=".jpg", help="image format of the export (default: .jpg)")
    p.add_argument("--repeats", type=int, default=3, help="cached loads timed (default: 3)")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "bench_folders_cpu.json"))
    args = p.parse_args(argv)
    if os.path.abspath(args.folder).startswith(ROOT + os.sep):
        p.error("--folder must lie outside the repository: the export is FER2013")
    machine = machine_info()
    if os.path.isdir(args.folder):
        print(f"{args.folder} exists: measuring it as it is (delete it to export again)")
    else:
        start = time.perf_counter()
        n = export_csv(args.csv, args.folder, args.ext)
        print(f"exported {n:,} faces to {args.folder} in {time.perf_counter() - start:.0f} s")
    rows, csv_data, folder_data = measure(args.csv, args.folder, args.repeats)
    same = compare(csv_data, folder_data)
    print(f"CPU: {machine['cpu']} ({machine['cores']} cores), load average "
          f"{machine['load_average_at_start'][0]:.1f} at the start")
    print("| what | images | seconds | images/s |\n|---|---:|---:|---:|")
    for what, (seconds, n) in rows.items():
        print(f"| {what} | {n:,} | {seconds:.2f} | {n / seconds:,.0f} |")
    print("the folder's faces against the CSV's: " + ", ".join(f"{k} {v}" for k, v in same.items()))
    save_json({"machine": machine, "command": " ".join(["python3", "tools/bench_folders.py", *sys.argv[1:]]),
               "ext": args.ext, "repeats": args.repeats,
               "rows": {k: {"seconds": round(s, 3), "images": n, "images_per_s": round(n / s)}
                        for k, (s, n) in rows.items()}, "same_faces": same}, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
