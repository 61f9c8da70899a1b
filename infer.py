"""Reload checkpoints and judge them: metrics on a labelled split, or the faces in your own photos.

    python3 infer.py --images photos/ me.jpg      # the shipped default model
    python3 infer.py --checkpoint checkpoint/RUN/vgg2_0_2_best.pth -d synthetic
    python3 infer.py --checkpoint checkpoint/RUN/vgg2_4_2_conv3_best.pth -d data/fer2013.csv --tta tencrop
    python3 infer.py --checkpoint run1/vgg2_2_2_best.pth run2/vgg2_0_2_best.pth --images photos/
    python3 infer.py --checkpoint pretrained/fer2013_vgg2_4_2_conv5.pth --video interview.mp4 clips/
    python3 infer.py --checkpoint pretrained/fer2013_vgg2_4_2_conv5.pth --video 0   # a camera, until Ctrl-C
    python3 infer.py --checkpoint pretrained/fer2013_vgg2_4_2_conv5.pth -d my_faces/ --split all

Without --checkpoint the shipped default, pretrained/fer2013_vgg2_4_2_conv5.pth, is used; several
checkpoints make an ensemble. The command line only: report.py does -d (a CSV or a folder of
images), photos.py --images, video.py --video, explain.py --explain, checkpoint.py --export.
"""
if __name__ == "__main__":  # Ctrl-C while the imports load (a second or more) just ends the
    import signal  # process, without a traceback; utils.run_cli makes it KeyboardInterrupt again
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import os
import sys
import time

import torch

import checkpoint
import dataset
import explain
import faces
import onnx_model
import photos
import predict
import report
import video
from utils import (DEFAULT_CSV, EMOTIONS, SPLITS, Parser, UserError, autocast_dtype, check_writable,
                   device_flags, emotion_index, flag, new_folder, path_arg, printable, run_cli, select_device)

REPORT_FOLDER = "report"  # where -d's report goes when the call also classifies photos or videos


def default_output_dir(paths, kind="report", split="test"):
    """Where results go without -o, two levels deep: outputs/photos_<time> or outputs/video_<time>
    (`kind`; each call its own folder); a split report goes to outputs/<checkpoint's folder>_
    <checkpoint name>_<split> (ensembles: outputs/ensemble_<a+b>_<split>). Names that are not
    UTF-8 are made printable (OpenCV cannot write a video into a folder so named)."""
    if kind != "report":
        return os.path.join("outputs", time.strftime(f"{kind}_%Y%m%d-%H%M%S"))
    stems = [printable(os.path.splitext(os.path.basename(p))[0]) for p in paths]
    if len(paths) == 1:
        name = f"{printable(os.path.basename(os.path.dirname(os.path.abspath(paths[0]))))}_{stems[0]}"
    else:
        name = "ensemble_" + "+".join(stems)[:120]
    return os.path.join("outputs", f"{name}_{split}")


def get_args_parser():
    p = Parser(prog="infer.py", epilog="examples:\n" + __doc__.split("\n\n")[1],
               description="Judge trained checkpoints on a labelled split, or classify the faces in photos and videos.")
    g = p.add_argument_group("model")
    flag(g, "--checkpoint", "-c", nargs="+", type=path_arg, default=[predict.DEFAULT_CHECKPOINT], metavar="PATH",
         help="checkpoint file(s) (.pth or .onnx, or a run folder with one *_best.pth); several "
              "make an ensemble whose probabilities are averaged (default: the shipped "
              "pretrained/fer2013_vgg2_4_2_conv5.pth)")
    flag(g, "--tta", choices=predict.TTA_MODES, default="none",
         help="test-time augmentation: flip (mirror) or tencrop (corners, centre, mirrors); the "
              "result without it is reported too (default: none)")
    flag(g, "--export", type=path_arg, metavar="FILE",
         help="write an inference-only copy of the checkpoint to FILE, then stop: FILE.onnx an fp32 "
              "ONNX model (dynamic batch, normalisation inside; needs onnxscript), any other name "
              "the small PyTorch file (fp16 weights, no optimiser state)")

    g = p.add_argument_group("split report")
    flag(g, "-d", "--dataset", type=path_arg, default=None,
         help="FER2013-layout CSV, 'synthetic', or a folder of face images, DIR/[<split>/]<class>/* "
              f"(default: the checkpoint's data set, else {DEFAULT_CSV}; none with --images or --video, "
              "and given with them, its report goes into <output>/report)")
    flag(g, "--split", choices=(*SPLITS, "all"), default="test",
         help="train, val or test (Training, PublicTest, PrivateTest; a folder's own, or held out "
              "of it), or all: every face, for a data set the model was not trained on (default: test)")
    dataset.faces_flag(g)
    flag(g, "--num_save", type=int, default=16,
         help="faces of the split saved as images and shown in the grid (default: 16)")
    flag(g, "--skip_bad_rows", action="store_true",
         help="drop malformed CSV rows (with a warning that counts them)")

    g = p.add_argument_group("photos and videos")
    flag(g, "--images", nargs="+", type=path_arg, metavar="PATH",
         help="photos or folders of photos to classify (every format OpenCV reads)")
    flag(g, "--no_detect", dest="detect", action="store_false",
         help="with --images: each image is one already-cropped face (no face detection)")
    flag(g, "--detector", choices=tuple(faces.DETECTORS), default="haar",
         help="face detector: haar (OpenCV), haar_profile (+ turned faces), hog (dlib; pip install "
              "dlib-bin); README 'Finding faces' compares them (default: haar)")
    flag(g, "--min_face", type=int, default=0, metavar="PIXELS", help="ignore faces narrower than this")
    flag(g, "--strictness", choices=("low", "normal", "high"), default=None,
         help=f"how sure the detector must be: high finds fewer false faces, low more real ones "
              f"(default: {faces.PHOTO_STRICTNESS} for photos, {faces.VIDEO_STRICTNESS} for video frames)")
    flag(g, "--video", nargs="+", type=path_arg, metavar="PATH|INDEX",
         help="video files, folders of videos, or camera numbers (0: the first camera, until "
              "Ctrl-C): per-frame emotions of tracked faces, an annotated video, a timeline")
    flag(g, "--every", type=int, default=1, metavar="N",
         help="with --video: analyse every N-th frame (default: 1, all)")
    flag(g, "--detect_every", type=int, default=video.DETECT_EVERY, metavar="K",
         help="with --video: look for faces on every K-th analysed frame, the tracker carries the "
              f"boxes in between (default: {video.DETECT_EVERY}; 1: detect on every frame)")
    flag(g, "--no_smooth", dest="smooth", action="store_false",
         help=f"with --video: label each frame on its own in the annotated video (default: the mean "
              f"of a track's last {video.SMOOTH_FRAMES} frames; frames.csv always has raw values)")
    flag(g, "--show", action="store_true",
         help="with --video: show the annotated frames in a window (needs OpenCV with GUI support; "
              "q or Esc there acts as Ctrl-C)")

    g = p.add_argument_group("explanations")
    flag(g, "--explain", action="store_true",
         help="Grad-CAM heat maps of the predicted class over each reported face: the --num_save "
              "faces of a split (faces/<Emotion>_<i>_cam.png), every face of --images "
              "(cams/<photo>_face<j>_cam.png beside the crop), and explain_grid.png; maps come from "
              "each model's last convolutional block, on the face without TTA; an ensemble shows "
              "the average of its members' maps; with --video see --explain_every")
    flag(g, "--explain_every", type=int, default=25, metavar="N",
         help="with --explain and --video: maps for the faces of every N-th analysed frame that has "
              "faces, in <video folder>/cams/frame<index>_face<j>_cam.png (default: 25)")
    flag(g, "--explain_class", type=emotion_index, metavar="EMOTION",
         help=f"with --explain (implied): explain this class instead of the predicted one "
              f"({', '.join(EMOTIONS)})")

    g = p.add_argument_group("output and hardware")
    flag(g, "-o", "--output", type=path_arg, default=None,
         help="output folder, used when missing or empty, else FOLDER_2, _3, ... (default: "
              "outputs/photos_<time> or outputs/video_<time>; for a split outputs/<checkpoint "
              f"folder>_<checkpoint name>_<split>; a split beside photos or videos: <output>/{REPORT_FOLDER})")
    flag(g, "--batch_size", type=int, default=None,
         help="faces per batch (default: 64 on a CPU, 512 on a GPU)")
    device_flags(g)
    flag(g, "--debug", action="store_true", help="show tracebacks")
    return p


def check_flags(parser, args):
    """Flags that contradict each other or make no sense are refused before any work."""
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.num_save < 0:
        parser.error("--num_save must be >= 0")
    if min(args.every, args.detect_every, args.explain_every) < 1:
        parser.error("--every, --detect_every and --explain_every must be at least 1")
    if args.video is not None and not args.detect:
        parser.error("--no-detect applies to --images only (video frames are searched for faces)")
    video_flags = [name for name, used in (("--every", args.every != 1), ("--show", args.show),
                                           ("--detect_every", args.detect_every != video.DETECT_EVERY),
                                           ("--no_smooth", not args.smooth)) if used]
    if video_flags and args.video is None:
        parser.error(f"{', '.join(video_flags)} apply to --video only")
    detector_flags = [name for name, used in (("--detector", args.detector != "haar"),
                                              ("--min_face", args.min_face != 0),
                                              ("--strictness", args.strictness is not None)) if used]
    if detector_flags and args.images is None and args.video is None:  # -d DIR: its faces as training cut them
        parser.error(f"{', '.join(detector_flags)} apply to --images and --video; a split report takes "
                     "its faces as training did (a folder's: --faces, Haar at the photo default)")
    if args.export is not None and len(args.checkpoint) != 1:
        parser.error("--export takes one checkpoint")


def export(source, target):
    """--export: an inference-only copy of one checkpoint (fp16 .pth, or .onnx); an existing
    target is replaced only when it is an earlier export (checkpoint.check_export_target)."""
    size = os.path.getsize(checkpoint.export(source, target)) / 2**20
    kind = f"ONNX, opset {onnx_model.OPSET}, fp32, dynamic batch" if onnx_model.is_onnx(target) else "fp16 PyTorch"
    print(f"wrote {target} ({size:.1f} MiB, {kind})")


def report_split(models, args, paths, out_dir, explaining):
    """-d: the report on one split of a labelled data set, with Grad-CAM maps of its saved faces."""
    data = report.evaluation_data(paths, args.dataset, args.skip_bad_rows, args.faces)
    result, images, labels = report.report_split(models, data, args.split, out_dir, args.tta,
                                                 args.num_save, args.batch_size, args.device)
    if explaining:
        cams, _ = explain.explain_saved_faces(models, result, images, labels, args.explain_class,
                                              args.batch_size, args.device)
        print(f"wrote {len(cams)} Grad-CAM map(s) beside the faces in {result['folder']}"
              + (" and explain_grid.png" if cams else ""))


def detector(args, side=faces.DETECT_SIDE, strictness=faces.PHOTO_STRICTNESS):
    return faces.face_detector(args.detector, side, args.strictness or strictness, min_face=args.min_face)


def classify_photos(models, args, out_dir, explaining):
    """--images: annotated copies, faces.csv and faces.json, and Grad-CAM maps with --explain."""
    result = photos.classify_photos(
        args.images, lambda crops: predict.predict(models, crops, args.tta, args.batch_size, args.device),
        out_dir, detector(args) if args.detect else faces.WholePicture(), keep_crops=explaining)
    if explaining:
        annotated = result["annotated_dir"]
        found = [(os.path.relpath(target, annotated), crops, probs) for target, crops, probs in result["crops"]]
        explain.report_maps(*explain.explain_found_faces(models, found, out_dir, args.explain_class,
                                                         args.batch_size, args.device), out_dir)


def classify_videos(models, args, out_dir, explaining):
    """--video: per video an annotated video, frames.csv, timeline and summary, and with --explain
    Grad-CAM maps of every --explain_every-th frame that has faces."""
    if args.device.type == "cpu":  # batches of 1-3 faces: a second thread only spins (README
        torch.set_num_threads(1)  # "Video": 2 against 21 frames/s), OpenCV has the other core
    settings = video.VideoSettings(args.every, args.detect_every, args.smooth, args.show,
                                   keep_every=args.explain_every if explaining else 0)
    summaries = video.classify_videos(
        args.video, lambda crops: predict.predict(models, crops, args.tta, args.batch_size, args.device),
        out_dir, settings, detector(args, video.VIDEO_DETECT_SIDE, faces.VIDEO_STRICTNESS),
        reserved=[REPORT_FOLDER] if args.dataset is not None else ())
    for summary in summaries if explaining else ():
        folder = summary["folder"]
        explain.report_maps(*explain.explain_found_faces(models, summary["kept"], folder, args.explain_class,
                                                         args.batch_size, args.device), folder)


def main(argv=None):
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    paths = [checkpoint.resolve(p) for p in args.checkpoint]
    if args.export is not None:
        export(paths[0], args.export)
        return 0
    explaining = args.explain or args.explain_class is not None
    if explaining and any(onnx_model.is_onnx(p) for p in paths):
        raise UserError("--explain needs gradients, which ONNX files do not give: pass the .pth "
                        "checkpoint(s) for Grad-CAM")
    args.device = select_device(args.device)
    models = predict.load_models(paths, args.device)
    media = args.images is not None or args.video is not None
    if media:  # (-d DIR evaluates a model of other classes)
        predict.require_emotions(models, "--images and --video")
    if explaining:
        for model in models:
            explain.cam_layer(model)  # fail before the work when a model cannot be explained
    kind = ("photos" if args.images else "video") if media else "report"
    out_dir = args.output or default_output_dir(paths, kind, args.split)
    if media:  # a new folder (the timestamped default: even beside a call of the same second), or -o's if empty
        out_dir = new_folder(out_dir, empty_is_new=bool(args.output))
    # A split report makes its own new folder (report.report); photos and videos write into out_dir.
    check_writable(out_dir if media else os.path.dirname(os.path.abspath(out_dir)))
    amp_dtype = autocast_dtype(args.amp, args.device)
    onnx = [isinstance(m, onnx_model.OnnxModel) for m in models]
    precision = (f", {str(amp_dtype).split('.')[-1]} autocast" if amp_dtype and not all(onnx) else ", fp32")
    print(f"loaded {report.describe(models)}: {', '.join(m.name for m in models)} on {args.device.type}"
          + precision + (", ONNX through onnxruntime on the CPU (fp32)" if any(onnx) else ""))
    if args.amp and amp_dtype is None:
        print(f"note: --amp needs CUDA or a CPU that computes bf16 natively (AVX512-BF16 or AMX); computing in fp32 on {args.device.type}")
    with predict.autocast(args.device, amp_dtype):
        if not media or args.dataset is not None:  # beside photos or videos: in its own subfolder
            report_split(models, args, paths, os.path.join(out_dir, REPORT_FOLDER) if media else out_dir,
                         explaining)
        if args.images is not None:
            classify_photos(models, args, out_dir, explaining)
        if args.video is not None:
            classify_videos(models, args, out_dir, explaining)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
