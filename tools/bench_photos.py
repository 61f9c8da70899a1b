"""Speed of infer.py --images: folders of pre-cropped faces (--no-detect) in faces/s, and photos
with face detection in images/s, with the faces of up to photos.PHOTO_BATCH photos per forward
pass against one pass per photo (PHOTO_BATCH = 1), in the same run.

    python3 tools/bench_photos.py --out results/bench_photos.json

The inputs are drawn here: --faces synthetic 48x48 faces as PNG files (synthetic.make_synthetic),
and --photos 640x480 scenes with 0-3 faces (tools/bench_detect.make_scenes). Times are of
photos.classify_photos after the model is loaded (start-up excluded), with the shipped model in
bf16 where the CPU has it, as infer.py runs it.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.common import machine_info  # noqa: E402

import faces  # noqa: E402
import photos  # noqa: E402
import predict  # noqa: E402
from utils import autocast_dtype, save_json  # noqa: E402

BATCH = photos.PHOTO_BATCH  # the default, measured against one photo per forward pass


def write_inputs(folder, n_faces, n_photos):
    import cv2

    import synthetic
    from tools.bench_detect import make_scenes
    images, _, _ = synthetic.make_synthetic(n_faces, 0, 0, seed=0)
    os.makedirs(os.path.join(folder, "faces"))
    for k, face in enumerate(images):
        cv2.imwrite(os.path.join(folder, "faces", f"{k:05d}.png"), face)
    os.makedirs(os.path.join(folder, "photos"))
    for k, (scene, _) in enumerate(make_scenes(n_photos, seed=1)):
        cv2.imwrite(os.path.join(folder, "photos", f"{k:04d}.jpg"), scene)


def timed(folder, kind, models, batch, detector):
    import torch
    photos.PHOTO_BATCH = batch
    out = tempfile.mkdtemp(dir=folder)
    amp = autocast_dtype(True, torch.device("cpu"))
    started = time.perf_counter()
    with predict.autocast("cpu", amp):
        result = photos.classify_photos([os.path.join(folder, kind)], lambda crops: predict.predict(models, crops),
                                        out, detector, log=lambda *a: None)
    seconds = time.perf_counter() - started
    found = sum(f["box"] is not None for f in result["faces"])
    return {"inputs": kind, "photo_batch": batch, "images": result["processed"], "faces": found,
            "seconds": round(seconds, 2), "images_per_s": round(result["processed"] / seconds, 1),
            "faces_per_s": round(found / seconds, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="tools/bench_photos.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--faces", type=int, default=1000)
    p.add_argument("--photos", type=int, default=100)
    p.add_argument("--out", default="outputs/bench_photos.json")
    args = p.parse_args(argv)
    models = predict.load_models()
    report = {"machine": machine_info(), "model": os.path.basename(predict.DEFAULT_CHECKPOINT), "runs": []}
    print("| inputs | faces per forward pass | images | faces | seconds | images/s | faces/s |\n|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        write_inputs(folder, args.faces, args.photos)
        for kind, detector in (("faces", faces.WholePicture()), ("photos", faces.face_detector())):
            for batch in (BATCH, 1):
                run = timed(folder, kind, models, batch, detector)
                report["runs"].append(run)
                print(f"| {kind} | {'all of ' + str(batch) + ' photos' if batch > 1 else 'one photo'} | {run['images']} | "
                      f"{run['faces']} | {run['seconds']} | {run['images_per_s']} | {run['faces_per_s']} |", flush=True)
                save_json(report, args.out)
    print(f"\n{report['machine']['cpu']}, {report['machine']['cores']} cores; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
