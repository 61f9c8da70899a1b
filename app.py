"""A local web page for the emotion models: drop a photo or a video, or turn on the camera.

    python3 app.py                                   # http://127.0.0.1:7860, the shipped model
    python3 app.py -c checkpoint/RUN/vgg2_2_2_best.pth run2/vgg2_0_2_best.pth   # an ensemble
    python3 app.py -c model.onnx --port 8080
    python3 app.py --host 0.0.0.0                    # other machines too: read the warning it prints

Needs Gradio: `pip install -r requirements-app.txt`. The page is a thin layer over the functions
infer.py uses (imported in one block below), so the page and the command line give the same
answers: Photo is `infer.py --images` for one picture (the annotated copy, faces.csv, and with
the Grad-CAM switch the maps of `--explain`), Video is `infer.py --video` for one file, Camera
annotates the browser's camera frames as they arrive.

Offline and local by default: analytics off, fonts served by the app itself, no share link;
bound to 127.0.0.1. Uploads and results live in a temporary folder removed when the app stops;
the page can read no other file of the server. The model is loaded once and used by one request
at a time; requests queue.
"""
import atexit
import functools
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

# Before Gradio is imported: it reads these once. No usage statistics, no Hugging Face telemetry.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402

try:
    import gradio as gr
except ImportError as err:  # the page's own requirement: training does not need it
    raise SystemExit("app.py needs Gradio: pip install -r requirements-app.txt") from err

# Everything the page computes comes from these functions, the ones infer.py uses.
from explain import explain_faces, explained_classes, overlay  # noqa: E402
from faces import (EMOTION_COLOURS, FACE_MARGIN, Skipped, annotate, crop_face, read_image,  # noqa: E402
                   write_image)
from onnx_model import OnnxModel  # noqa: E402
from photos import photo_rows, unique_name, write_faces_table  # noqa: E402
from predict import DEFAULT_CHECKPOINT, detect_emotions, load_models, predict, require_emotions  # noqa: E402
from utils import EMOTIONS, Parser, flag, path_arg, run_cli, select_device  # noqa: E402
from video import classify_video  # noqa: E402

MAX_FILE_MB = 100  # uploads above this are refused by the server before they are stored
KEEP_S = 3600  # a request's files (uploads, results) are deleted after an hour
CHART_FACES = 4  # the bar chart shows this many faces at most (the table has them all)
CAMERA_EVERY_S = 0.1  # the browser sends a camera frame at most this often
# The tables on the page: faces.csv's columns but the file names; the video's per-track summary.
FACE_COLUMNS = ["face", "x", "y", "w", "h", "emotion", "confidence", *(f"p_{n}" for n in EMOTIONS)]
TRACK_COLUMNS = ["track", "frames", "on screen (s)", "first (s)", "last (s)", "mostly", *EMOTIONS]


@dataclass
class Page:
    """What every request shares: the models (loaded once), a lock so that one request at a time
    uses them (Grad-CAM hooks a layer: a forward pass of another request would feed it), and the
    temporary folder of the uploads (Gradio's) and of the results (`folder`)."""
    models: list
    device: object
    root: str
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def folder(self):
        return os.path.join(self.root, "results")

    @property
    def explainable(self):
        return not any(isinstance(m, OnnxModel) for m in self.models)

    def faces(self, image):
        with self.lock:
            return detect_emotions(self.models, image, device=self.device)

    def predict(self, faces):
        with self.lock:
            return predict(self.models, faces, device=self.device)

    def cams(self, image, boxes, probs):
        """Grad-CAM maps of the predicted classes on the crops the model saw (faces_in_image's)."""
        import cv2
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        crops = np.stack([crop_face(grey, box) for box in boxes])
        with self.lock:
            return explain_faces(self.models, crops, explained_classes(probs), device=self.device)

    def new_folder(self):
        """A fresh folder for one request's files; those of requests older than KEEP_S go."""
        now = time.time()
        for old in os.scandir(self.folder):
            if old.is_dir() and now - old.stat().st_mtime > KEEP_S:
                shutil.rmtree(old.path, ignore_errors=True)
        return tempfile.mkdtemp(dir=self.folder)


# ----------------------------------------------------------------------------- photo

def photo(page, path, gradcam=False):
    """The Photo tab: one picture through infer.detect_emotions, drawn by photos.annotate as
    `infer.py --images` draws it, and the same faces.csv. Returns (annotated picture, faces
    table, bar chart, faces.csv, message); a file that is not a usable picture gives only the
    message."""
    if path is None:
        return None, table(FACE_COLUMNS), None, None, "Drop a photo above, paste one, or take one."
    name = os.path.basename(path)
    try:
        image, factor, note = read_image(path)
    except Skipped as why:
        return None, table(FACE_COLUMNS), None, None, f"**{name}** {why}."
    faces = page.faces(image)
    boxes = [f["box"] for f in faces]
    probs = np.array([[f["emotions"][n] for n in EMOTIONS] for f in faces]).reshape(-1, len(EMOTIONS))
    if gradcam and faces and page.explainable:
        paint_cams(image, boxes, page.cams(image, boxes, probs))
    folder = page.new_folder()
    annotated = os.path.join(folder, unique_name(name, set()))
    write_image(annotated, annotate(image, [(f["box"], f["emotion"], f["confidence"]) for f in faces]))
    rows = photo_rows(name, boxes, probs, factor, EMOTIONS, os.path.basename(annotated))
    write_faces_table(rows, EMOTIONS, folder)
    said = "; ".join(f"face {j}: {f['emotion']} {f['confidence']:.0%}" for j, f in enumerate(faces))
    message = f"**{name}**: " + (f"{len(faces)} face(s): {said}." if faces else "no face found.")
    if note:
        message += f" (The picture {note}.)"
    if gradcam and faces and not page.explainable:
        message += " Grad-CAM needs .pth checkpoints (ONNX files have no gradients)."
    return (annotated, table(FACE_COLUMNS, [r for r in rows if r["face"] is not None]),
            bar_chart(faces), os.path.join(folder, "faces.csv"), message)


def table(columns, rows=()):
    """A table for the page: the values exact (API callers get them), shown to 3 decimals."""
    import pandas as pd
    return pd.DataFrame(list(rows), columns=columns).style.format(precision=3)


def paint_cams(image, boxes, cams):
    """Each face's Grad-CAM map over the area the model saw (its box plus photos.FACE_MARGIN) of
    a BGR picture, in place: the face in grey under the heat map, as explain.overlay draws it."""
    import cv2
    height, width = image.shape[:2]
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    for (x, y, w, h), cam in zip(boxes, cams):
        extra = FACE_MARGIN * max(w, h)
        x0, y0, x1, y1 = (int(round(v)) for v in (x - extra, y - extra, x + w + extra, y + h + extra))
        heat = cv2.resize(cam, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
        left, top, right, bottom = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
        painted = overlay(grey[top:bottom, left:right], heat[top - y0:bottom - y0, left - x0:right - x0])
        image[top:bottom, left:right] = painted
    return image


def bar_chart(faces, width=300, row=22):
    """The seven probabilities of each face (the first CHART_FACES) as bars in the annotation's
    colours, one panel per face, as an RGB picture. Drawn with OpenCV like the annotation: a
    matplotlib figure took 150-300 ms here, more than the faces themselves."""
    import cv2
    font, bars_left, top = cv2.FONT_HERSHEY_SIMPLEX, 78, 28
    bar_room = width - bars_left - 42  # a 100% bar leaves room for its "100%"
    panels = []
    for j, face in enumerate(faces[:CHART_FACES]):
        panel = np.full((top + row * len(EMOTIONS) + 6, width, 3), 255, np.uint8)
        cv2.putText(panel, f"face {j}: {face['emotion']} {face['confidence']:.0%}", (6, 19), font,
                    0.5, (0, 0, 0), 1, cv2.LINE_AA)
        for k, name in enumerate(EMOTIONS):
            y, p = top + k * row, face["emotions"][name]
            end = bars_left + int(round(p * bar_room))
            cv2.putText(panel, name, (6, y + 15), font, 0.42, (60, 60, 60), 1, cv2.LINE_AA)
            cv2.rectangle(panel, (bars_left, y + 3), (max(bars_left + 1, end), y + row - 4),
                          EMOTION_COLOURS[name], -1)
            cv2.putText(panel, f"{p:.0%}", (end + 4, y + 15), font, 0.42, (60, 60, 60), 1, cv2.LINE_AA)
        panels.append(panel)
    if not panels:
        return None
    if len(faces) > len(panels):
        panels.append(np.full_like(panels[0], 255))
        cv2.putText(panels[-1], f"+{len(faces) - len(panels) + 1} more faces: see the table",
                    (6, 19), font, 0.42, (60, 60, 60), 1, cv2.LINE_AA)
    return np.hstack(panels)[:, :, ::-1]


# ----------------------------------------------------------------------------- video

def video(page, path):
    """The Video tab: one file through photos.classify_video, as `infer.py --video` runs it.
    Returns (annotated video the browser plays, timeline picture, per-track summary, frames.csv,
    annotated.mp4, message); an unusable file gives only the message."""
    if path is None:
        return None, None, table(TRACK_COLUMNS), None, None, "Drop a video file above."
    name = os.path.splitext(os.path.basename(path))[0]
    folder = page.new_folder()
    try:
        summary = classify_video(path, name, page.predict, folder, log=lambda message: None)
    except Skipped as why:
        return None, None, table(TRACK_COLUMNS), None, None, f"**{os.path.basename(path)}** {why}."
    files = summary["files"]
    tracks = [[t["track"], t["frames"], t["time_on_screen_s"], t["first_s"], t["last_s"], t["dominant"],
               *(t["emotions"][n] for n in EMOTIONS)] for t in summary["tracks"]]
    message = (f"**{os.path.basename(path)}**: {summary['frames_analysed']} frames analysed "
               f"({summary['frames_per_s']:.1f}/s), ")
    if summary["tracks"]:
        message += f"{len(summary['tracks'])} tracked face(s); " + "; ".join(
            f"#{t['track']} mostly {t['dominant']} ({t['time_on_screen_s']:.1f} s)"
            for t in summary["tracks"][:5]) + "."
    else:
        message += "no face found in any frame."
    if summary["stopped_early"]:
        message += f" The file {summary['stopped_early']}."
    annotated = files.get("annotated.mp4")  # absent when no MP4 could be written (video.open_writer)
    if annotated is None:
        message += " No annotated video could be written; the table and timeline cover every analysed frame."
    return (annotated and browser_copy(annotated), files["timeline.png"],
            table(TRACK_COLUMNS, tracks), files["frames.csv"], annotated, message)


def browser_copy(path):
    """A WebM (VP8) copy of an annotated.mp4 for the page: classify_video writes MPEG-4 part 2,
    which browsers do not play. None when the file is missing or OpenCV cannot write WebM."""
    import cv2
    if not os.path.exists(path):
        return None
    cap = cv2.VideoCapture(path)
    fps = cap.get(cv2.CAP_PROP_FPS)
    target, writer = os.path.splitext(path)[0] + ".webm", None
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if writer is None:
                writer = cv2.VideoWriter(target, cv2.VideoWriter_fourcc(*"VP80"),
                                         fps if 0 < fps < 1000 else 25.0, frame.shape[1::-1])
                if not writer.isOpened():
                    return None
            writer.write(frame)
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    return target if writer is not None else None


# ----------------------------------------------------------------------------- camera

def camera(page, frame):
    """The Camera tab: one RGB frame from the browser, its faces found, classified and drawn as
    on a photo (each frame on its own: no tracker, so the labels follow the frame at once)."""
    if frame is None:
        return None
    image = np.ascontiguousarray(frame[:, :, ::-1])  # RGB -> BGR, the pipeline's order
    faces = page.faces(image)
    annotate(image, [(f["box"], f["emotion"], f["confidence"]) for f in faces])
    return image[:, :, ::-1]


# ----------------------------------------------------------------------------- the page

def photo_tab(page):
    with gr.Row():
        source = gr.Image(label="Photo: drop, paste or take one", type="filepath",
                          sources=["upload", "webcam", "clipboard"], elem_id="photo")
        picture = gr.Image(label="Emotions", interactive=False, buttons=["download", "fullscreen"],
                           elem_id="annotated")
    gradcam = gr.Checkbox(label="Grad-CAM: colour where each face's evidence lies (red: strongest)",
                          interactive=page.explainable,
                          info=None if page.explainable else "needs .pth checkpoints, not ONNX")
    message = gr.Markdown(elem_id="photo_message")
    faces = gr.Dataframe(table(FACE_COLUMNS), label="Faces (box in the file's pixels)",
                         interactive=False, elem_id="faces")
    chart = gr.Image(label="Probabilities per face", interactive=False, format="png",
                     buttons=["download"])
    csv = gr.File(label="faces.csv (as infer.py --images writes it)")
    def run(upload, gradcam):  # the file undecoded (preprocess=False): photos.read_image
        return photo(page, (upload or {}).get("path"), gradcam)  # says why one is unusable
    # gr.Image would decode the upload with PIL first and fail on a bad file with its own error;
    # Gradio still checks that the path is one of its uploads.
    gr.on([source.change, gradcam.change], run, [source, gradcam],
          [picture, faces, chart, csv, message], api_name="photo", preprocess=False)


def video_tab(page):
    with gr.Row():
        # A file, not gr.Video: browsers preview few codecs (not OpenCV's mp4v), and gr.Video
        # calls every other one "not playable" although the tab reads it. Any file is tried, as
        # `infer.py --video FILE` tries it (no extension list to pass first).
        source = gr.File(label="Video file", elem_id="video")
        shown = gr.Video(label="Emotions per tracked face", interactive=False, buttons=["download"],
                         elem_id="video_out")
    message = gr.Markdown(elem_id="video_message")
    timeline = gr.Image(label="Timeline: probabilities per tracked face", interactive=False,
                        buttons=["download", "fullscreen"])
    tracks = gr.Dataframe(table(TRACK_COLUMNS), label="Tracks (share of frames per emotion)",
                          interactive=False)
    with gr.Row():
        frames = gr.File(label="frames.csv (one row per face per frame)")
        mp4 = gr.File(label="annotated.mp4")

    def run(path, progress=gr.Progress(track_tqdm=True)):  # progress: classify_video's tqdm bar
        return video(page, path)
    source.upload(run, source, [shown, timeline, tracks, frames, mp4, message], api_name="video",
                  show_progress_on=[shown])


def camera_tab(page):
    with gr.Row():
        live = gr.Image(label="Camera", sources=["webcam"], streaming=True, elem_id="camera")
        shown = gr.Image(label="Emotions", streaming=True, interactive=False, format="jpeg",
                         buttons=["fullscreen"], elem_id="camera_out")
    gr.Markdown("Each frame is classified on its own as it arrives (the Video tab tracks faces); "
                "the frames stay on this machine.")
    # Several viewers at once: the model lock keeps their frames in turn.
    live.stream(functools.partial(camera, page), live, shown, stream_every=CAMERA_EVERY_S,
                concurrency_limit=4, api_name="camera")


def build_page(page, about, max_file_mb=MAX_FILE_MB):
    """The gr.Blocks page: three tabs wired to photo, video and camera."""
    with gr.Blocks(title="Facial emotions", delete_cache=(600, KEEP_S)) as demo:
        gr.Markdown(f"## Facial emotions\n{about}. Files up to {max_file_mb:g} MB. Everything "
                    "runs on this machine; uploads are deleted after an hour and when the page stops.")
        with gr.Tab("Photo"):
            photo_tab(page)
        with gr.Tab("Video"):
            video_tab(page)
        with gr.Tab("Camera"):
            camera_tab(page)
    return demo


def open_page(models, device, root):
    """The Page over loaded `models`, its uploads and results under `root` (a temporary folder)."""
    page = Page(models, device, os.path.abspath(root))
    os.environ["GRADIO_TEMP_DIR"] = page.root  # uploads: read by Gradio when the components are made
    os.environ["GRADIO_EXAMPLES_CACHE"] = os.path.join(page.root, "cache")  # else ./.gradio, served too
    os.makedirs(page.folder, exist_ok=True)
    return page


def serve(page, about="", host="127.0.0.1", port=7860, max_file_mb=MAX_FILE_MB, block=True,
          private=()):
    """Serve the page; block=False returns the running gr.Blocks (tests: .close() it).

    Gradio serves its upload folder and nothing else; this repository (checkpoints, code) and the
    `private` folders (the checkpoints') are blocked as well, unless the page's own folder is in
    them."""
    demo = build_page(page, about, max_file_mb)
    blocked = {os.path.dirname(os.path.abspath(__file__)), *map(os.path.abspath, private)}
    demo.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=False, ssr_mode=False, mcp_server=False,
        max_file_size=int(max_file_mb * 2**20), allowed_paths=[],
        blocked_paths=sorted(p for p in blocked if not is_inside(page.root, p)),
        show_error=True, quiet=not block, prevent_thread_lock=not block)
    return demo


def is_inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


# ----------------------------------------------------------------------------- command line

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def get_args_parser():
    p = Parser(prog="app.py", description="A local web page: photos, videos and the camera through "
                                          "the emotion models.",
               epilog="examples:\n" + __doc__.split("\n\n")[1])
    flag(p, "--checkpoint", "-c", nargs="+", type=path_arg, default=[DEFAULT_CHECKPOINT], metavar="PATH",
         help="checkpoint file(s) (.pth or .onnx, or a run folder with one *_best.pth); several make "
              "an ensemble (default: the shipped pretrained/fer2013_vgg2_4_2_conv5.pth)")
    flag(p, "--host", default="127.0.0.1",
         help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every "
              "network, with no login)")
    flag(p, "--port", type=int, default=7860, help="port (default: 7860)")
    flag(p, "--max_file_mb", type=float, default=MAX_FILE_MB,
         help=f"largest upload in MB, said on the page (default: {MAX_FILE_MB})")
    flag(p, "--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
         help="auto: CUDA, then Apple MPS, then CPU (default: auto)")
    flag(p, "--debug", action="store_true", help="show tracebacks")
    return p


def main(argv=None):
    import torch
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error("--port must lie in 1-65535")
    if args.max_file_mb <= 0:
        parser.error("--max_file_mb must be positive")
    if args.host not in LOOPBACK:
        print(f"warning: --host {args.host} lets every machine that can reach this one use the page "
              "(upload files, run the model); there is no login. Use it on a trusted network only.",
              file=sys.stderr)
    device = select_device(args.device)
    models = load_models(args.checkpoint, device)
    require_emotions(models, "the page's tabs (photo, video, camera)")
    if device.type == "cpu":  # 1-3 faces per call: a second thread only waits (README "Video")
        torch.set_num_threads(1)
    model = (f"{', '.join(os.path.basename(p) for p in args.checkpoint)} "
             f"({', '.join(m.name for m in models)}, on {device.type})")
    print(f"loaded {model}; Ctrl-C stops the page")
    root = tempfile.mkdtemp(prefix="fer-app-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    private = [os.path.dirname(os.path.abspath(p)) for p in args.checkpoint]
    serve(open_page(models, device, root), f"Model: {model}", args.host, args.port,
          args.max_file_mb, private=private)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
