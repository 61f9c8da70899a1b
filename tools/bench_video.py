"""Video speed and face-detection recall on a generated 640x480 clip (video.classify_video).

    python3 tools/bench_video.py                                    # random vgg2_4_2_conv3 weights
    python3 tools/bench_video.py --checkpoint pretrained/fer2013_vgg2_4_2_conv3.pth --json out.json
    python3 tools/bench_video.py --faces 1 --frames 300 --amp

The clip: the astronaut photo (skimage.data.astronaut) pasted 1-3 times, each copy moving and
changing size, on a plain gradient; the first and last few frames have no face. Its true face
boxes are known, so detection recall can be measured for several settings (detect on a smaller
copy, detect every k-th frame with the tracker in between) against the truth and against
detection on every full-size frame. Then the whole pipeline runs as `infer.py --video` does and
the table shows analysed frames/s and the share of reading (decoding), detection (with
tracking), classification (crops and model) and writing (CSV, annotation, MP4).
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.common import machine_info  # noqa: E402

import numpy as np  # noqa: E402

import faces  # noqa: E402
import video  # noqa: E402
from utils import save_json  # noqa: E402

HEAD = (0, 230, 120, 330)  # rows, columns of the astronaut photo holding her head and shoulders
FACE_IN_HEAD = (56, 66, 95, 95)  # her face box (x, y, w, h) inside that crop


def make_clip(path, frames=60, faces=1, size=(640, 480), fps=30.0, empty=(5, 5), fourcc="mp4v"):
    """Write a clip of `frames` frames with `faces` moving, resizing copies of the astronaut's
    head; the first empty[0] and the last empty[1] frames have none. Returns the true face boxes
    [(x, y, w, h), ...] of each frame."""
    import cv2
    import skimage.data
    width, height = size
    photo = np.ascontiguousarray(skimage.data.astronaut()[HEAD[0]:HEAD[1], HEAD[2]:HEAD[3], ::-1])
    ramp = np.linspace(60, 200, width, dtype=np.float32)[None, :] + np.linspace(0, 40, height)[:, None]
    background = np.repeat(ramp[:, :, None], 3, 2).astype(np.uint8)
    writer = cv2.VideoWriter(os.fspath(path), cv2.VideoWriter_fourcc(*fourcc), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"cannot write {path} with {fourcc}")
    truth = []
    for t in range(frames):
        frame = background.copy()
        boxes = []
        if empty[0] <= t < frames - empty[1]:
            phase = t / max(1, frames - 1)
            for k in range(faces):
                scale = (0.75 if faces == 1 else 0.6) + 0.15 * np.sin(2 * np.pi * (phase + k / 3))
                hh, hw = int(photo.shape[0] * scale), int(photo.shape[1] * scale)
                column = width / faces
                x = int(column * k + (column - hw) * (0.1 + 0.8 * phase if k % 2 == 0 else 0.9 - 0.8 * phase))
                y = int((height - hh) * (0.3 + 0.4 * np.sin(np.pi * phase + k)))
                x, y = min(max(0, x), width - hw), min(max(0, y), height - hh)
                frame[y:y + hh, x:x + hw] = cv2.resize(photo, (hw, hh), interpolation=cv2.INTER_AREA)
                fx, fy, fw, fh = FACE_IN_HEAD
                boxes.append((x + round(fx * scale), y + round(fy * scale), round(fw * scale),
                              round(fh * scale)))
        writer.write(frame)
        truth.append(boxes)
    writer.release()
    return truth


def read_all(path):
    import cv2
    cap = cv2.VideoCapture(os.fspath(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    return frames


def matched(found, wanted, threshold=0.5):
    """How many of the `wanted` boxes have a `found` box with IoU >= threshold (one each)."""
    left, n = list(found), 0
    for box in wanted:
        scores = [faces.overlap(box, f) for f in left]
        if scores and max(scores) >= threshold:
            left.pop(int(np.argmax(scores)))
            n += 1
    return n


def detection_recall(frames, truth, settings):
    """For each (detect side, detect every k): recall against the true boxes and against
    detection on every full-size frame, and detection + tracking milliseconds per frame."""
    import cv2
    greys = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in frames]
    out, reference = [], None
    for side, every in settings:
        detector = faces.face_detector(side=side)
        tracker, boxes_per_frame, ids = video.Tracker(), [], set()
        start = time.perf_counter()
        for k, grey in enumerate(greys):
            found_ids, boxes = video.face_boxes(tracker, detector, grey, k, every)
            boxes_per_frame.append(boxes)
            ids.update(found_ids)
        ms = (time.perf_counter() - start) / len(greys) * 1000
        if reference is None:
            reference = boxes_per_frame  # the first setting: every full-size frame
        n_true = sum(map(len, truth))
        n_ref = sum(map(len, reference))
        out.append({"detect_side": side, "detect_every": every, "ms_per_frame": round(ms, 2),
                    "recall_vs_truth": sum(matched(b, t) for b, t in zip(boxes_per_frame, truth)) / n_true,
                    "recall_vs_full_every_frame": sum(matched(b, r) for b, r in
                                                      zip(boxes_per_frame, reference)) / max(1, n_ref),
                    "false_boxes": sum(len(b) - matched(t, b) for b, t in zip(boxes_per_frame, truth)),
                    "tracks": len(ids)})
    return out


def bench_video(checkpoint=None, model="vgg2_4_2_conv3", frames=150, faces=(1, 2, 3), every=1,
                detect_every=video.DETECT_EVERY, detect_side=video.VIDEO_DETECT_SIDE, amp=False,
                threads=None, recall_settings=None, folder=None):
    """Generate the clips, measure detection recall and the whole pipeline; returns a dict."""
    import torch

    import predict
    from utils import EMOTIONS, amp_dtype_for
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = folder or tmp
        if checkpoint is None:
            from models import FerNet
            torch.manual_seed(0)
            checkpoint = os.path.join(tmp, f"random_{model}.pth")
            net = FerNet(model).eval()
            import checkpoint as ckpt_module
            torch.save({"format_version": ckpt_module.FORMAT, "model_name": net.name,
                        "model_state": net.state_dict(), "class_names": list(EMOTIONS)},
                       checkpoint)
        models = predict.load_models([checkpoint], "cpu")
        dtype = amp_dtype_for(torch.device("cpu")) if amp else None

        def predict_faces(crops):
            with predict.autocast("cpu", dtype):
                return predict.predict(models, crops, "none", None, "cpu")

        result = {"machine": machine_info(), "checkpoint": os.path.basename(checkpoint),
                  "model": models[0].name, "amp": str(dtype).split(".")[-1] if dtype else None,
                  "torch_threads": torch.get_num_threads(), "frames": frames, "every": every,
                  "detect_every": detect_every, "detect_side": detect_side, "runs": []}
        settings = recall_settings if recall_settings is not None else [
            (640, 1), (480, 1), (400, 1), (400, 2), (400, 3), (400, 4), (320, 1), (320, 2)]
        for n in faces:
            clip = os.path.join(folder, f"clip_{n}face.mp4")
            truth = make_clip(clip, frames, n)
            recall = detection_recall(read_all(clip), truth, settings) if settings else []
            summary = video.classify_video(clip, f"clip_{n}face", predict_faces,
                                           os.path.join(folder, f"out_{n}face"),
                                           video.VideoSettings(every, detect_every),
                                           faces.face_detector(side=detect_side), log=lambda *a: None)
            faces_found = sum(t["frames"] for t in summary["tracks"])
            result["runs"].append({"faces": n, "frames_per_s": round(summary["frames_per_s"], 2),
                                   "time_share": summary["time_share"],
                                   "tracks": len(summary["tracks"]),
                                   "face_rows": faces_found, "true_faces": sum(map(len, truth)),
                                   "recall": recall})
    return result


def table(result):
    lines = [f"{result['model']} ({result['checkpoint']}), amp {result['amp']}, "
             f"{result['torch_threads']} torch threads, {result['machine']['cpu']} "
             f"({result['machine']['cores']} cores, load {result['machine']['load_average']})",
             f"detect on a copy {result['detect_side']} px across, every {result['detect_every']} "
             "analysed frame(s); 640x480 clip",
             "", "| faces | frames/s | read | detect+track | classify | write | tracks |",
             "|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        s = run["time_share"]
        lines.append(f"| {run['faces']} | {run['frames_per_s']:.1f} | {s['read']:.0%} | "
                     f"{s['detect']:.0%} | {s['classify']:.0%} | {s['write']:.0%} | {run['tracks']} |")
    if not any(run["recall"] for run in result["runs"]):
        return "\n".join(lines)
    lines += ["", "| faces | detect side | every k | ms/frame | recall vs truth | "
              "recall vs full-size every frame | false boxes | tracks |", "|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        for r in run["recall"]:
            lines.append(f"| {run['faces']} | {r['detect_side']} | {r['detect_every']} | "
                         f"{r['ms_per_frame']:.1f} | {r['recall_vs_truth']:.3f} | "
                         f"{r['recall_vs_full_every_frame']:.3f} | {r['false_boxes']} | {r['tracks']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--checkpoint", help="a checkpoint (default: random weights of --model)")
    p.add_argument("--model", default="vgg2_4_2_conv3", help="with random weights (default: %(default)s)")
    p.add_argument("--frames", type=int, default=150, help="frames per clip (default: %(default)s)")
    p.add_argument("--faces", type=int, nargs="+", default=[1, 2, 3], help="clips with this many faces")
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--detect_every", "--detect-every", type=int, default=video.DETECT_EVERY)
    p.add_argument("--detect_side", "--detect-side", type=int, default=video.VIDEO_DETECT_SIDE)
    p.add_argument("--amp", action="store_true", help="bf16 autocast where the CPU has it")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default: 1, as infer.py --video uses on a CPU)")
    p.add_argument("--json", help="also write the result to this JSON file")
    p.add_argument("--skip_recall", "--skip-recall", action="store_true",
                   help="only the pipeline's speed, not the detection recall of several settings")
    args = p.parse_args(argv)
    result = bench_video(args.checkpoint, args.model, args.frames, args.faces, args.every,
                         args.detect_every, args.detect_side, args.amp, args.threads,
                         [] if args.skip_recall else None)
    print(table(result))
    if args.json:
        save_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
