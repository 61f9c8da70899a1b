"""Faces in videos and from cameras: track them, classify them frame by frame, write an annotated
video, frames.csv, a timeline and a per-track summary.

`infer.py --video PATH|INDEX [...]` calls classify_videos; as in photos.py the model comes in as a
function from faces (N, 48, 48) to probabilities (N, 7).
"""
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from faces import (EARLIER_OUTPUT, EMOTION_COLOURS, IMAGE_EXTENSIONS, VIDEO_STRICTNESS, Skipped, annotate,
                   crop_face, face_detector, overlap, walk_inputs, warn)
from utils import EMOTIONS, DiskFull, UserError, full_disk, is_utf8, printable, save_figure, save_json

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv",
                    ".flv", ".3gp", ".ts", ".mts", ".m2ts", ".ogv")
VIDEO_DETECT_SIDE = 400  # video frames are searched for faces on a copy this wide (640x480: 0.625x)
DETECT_EVERY = 3  # detect on every 3rd analysed frame; the tracker carries the boxes in between
SMOOTH_FRAMES = 5  # the annotation's label: the mean probabilities of a track's last 5 frames
MAX_MISSED = 5  # a track not re-detected in this many detection rounds ends
CUT_CHANGE = 30.0  # mean grey-level change of a 64x48 thumbnail from one analysed frame to the next: a shot cut
MAX_SIZE_JUMP = 1.6  # a detection this many times larger or smaller than a track's box starts a new track
MIN_LIKENESS = 0.3  # nor does one whose 16x16 look correlates less than this with the track's last one
TIMELINE_TRACKS = 8  # the timeline shows at most this many tracks (the longest ones)
VIDEO_FILES = ("frames.csv", "annotated.mp4", "timeline.png", "summary.json")


def frame_columns():
    return ["video", "frame", "time_s", "track", "x", "y", "w", "h", "emotion", "confidence",
            *[f"p_{n}" for n in EMOTIONS]]


def find_videos(paths):
    """Expand inputs into ([(source, output name)], [(path, reason)]): a whole number that is not
    an existing file is a camera index; files are tried whatever their extension; folders give
    their files with a video extension (recursively)."""
    found, skipped, seen = [], [], set()
    for given in map(os.fspath, paths):
        if given.isdigit() and not os.path.exists(given):
            found.append((int(given), f"camera{given}"))
        elif not os.path.exists(given):
            skipped.append((given, "does not exist (no such file or folder)"))
        elif given.lower().endswith(IMAGE_EXTENSIONS):
            skipped.append((given, "is a photo, not a video: pass photos with --images"))
        elif not os.path.isdir(given):
            found.append((given, os.path.splitext(os.path.basename(given))[0]))
        else:
            before, earlier = len(found), []
            for folder, files in walk_inputs(given, earlier):
                found += [(os.path.join(folder, f), os.path.splitext(f)[0]) for f in files
                          if f.lower().endswith(VIDEO_EXTENSIONS)]
            skipped += [(path, EARLIER_OUTPUT) for path in earlier]
            if len(found) == before:
                skipped.append((given, "is a folder without video files ("
                                + ", ".join(e[1:] for e in VIDEO_EXTENSIONS[:6]) + ", ...)"))
    unique = []
    for source, name in found:
        key = source if isinstance(source, int) else os.path.realpath(source)
        if key not in seen:
            seen.add(key)
            unique.append((source, name))
    return unique, skipped


def open_video(source):
    """cv2.VideoCapture of a file or a camera index, and (fps, announced frame count or 0).
    Raises Skipped with the reason when it cannot be opened or holds no frame."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's and OpenCV's warnings off:
    import cv2  # the reason is said here in one line (read once, before the first video is opened)
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    camera = isinstance(source, int)
    if not camera and not is_utf8(source):  # OpenCV crashes on such names
        raise Skipped("has a path that is not valid UTF-8, which OpenCV cannot open: rename it")
    if not camera:
        try:
            if os.path.getsize(source) == 0:
                raise Skipped("is an empty (zero-byte) file")
        except OSError as err:
            raise Skipped(f"cannot be read ({err.strerror or err})") from err
        cap = cv2.VideoCapture(source, cv2.CAP_FFMPEG)
    else:
        cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        cap.release()
        raise Skipped("is not a camera that can be opened (no camera with that index?)" if camera
                      else "could not be opened as a video (not a video file, or corrupt or "
                           "truncated: an MP4 cut short loses its index)")
    fps = cap.get(cv2.CAP_PROP_FPS)
    fps = fps if 0 < fps < 1000 else 30.0
    count = 0 if camera else max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT)))
    return cap, fps, count


class Tracker:
    """Gives each face a track id that it keeps from frame to frame.

    A detection continues the track whose box (moved on by its speed) it overlaps most (IoU at
    least 0.3), or whose centre is within 3/4 of a face of its own; matches are taken best first,
    one detection per track, never a box whose size jumps (MAX_SIZE_JUMP) or whose look changes
    sharply (MIN_LIKENESS). A track not re-detected in MAX_MISSED detection rounds ends, so a
    face that leaves and comes back may get a new id; `end_all` ends every track (a shot cut).
    Between detections, `carry` moves the boxes of the tracks seen at the last detection at their
    speed. Each track also keeps its last `window` probabilities for a steady label (`smoothed`)."""

    def __init__(self, window=SMOOTH_FRAMES):
        self.tracks = {}  # id -> {"box", "frame", "speed" (dx, dy, dw, dh per frame), "missed", "probs"}
        self.next_id, self.window = 1, window

    def _at(self, track, frame):
        step = frame - track["frame"]
        return tuple(v + s * step for v, s in zip(track["box"], track["speed"]))

    def end_all(self):
        """End every track: after a shot cut no face continues (ids keep counting up)."""
        self.tracks = {}

    def update(self, boxes, frame, looks=None):
        """Match the detections of `frame` (an increasing number) to tracks; their ids in order.
        `looks`: each detection's look (see `look`), to keep a track from passing to another face."""
        from collections import deque
        looks = looks or [None] * len(boxes)
        pairs = []
        for tid, track in self.tracks.items():
            tx, ty, tw, th = self._at(track, frame)
            for j, (x, y, w, h) in enumerate(boxes):
                iou = overlap((tx, ty, tw, th), (x, y, w, h))
                dist = math.hypot(tx + tw / 2 - x - w / 2, ty + th / 2 - y - h / 2)
                near = iou >= 0.3 or dist <= 0.75 * max(tw, w)
                same = (max(w / max(tw, 1), tw / max(w, 1)) <= MAX_SIZE_JUMP
                        and likeness(track.get("look"), looks[j]) >= MIN_LIKENESS)
                if near and same:
                    pairs.append((-iou, dist, tid, j))
        ids, taken = [None] * len(boxes), set()
        for _, _, tid, j in sorted(pairs):
            if ids[j] is None and tid not in taken:
                ids[j] = tid
                taken.add(tid)
        for j, box in enumerate(boxes):
            if ids[j] is None:
                ids[j], self.next_id = self.next_id, self.next_id + 1
                self.tracks[ids[j]] = {"box": box, "frame": frame, "speed": (0, 0, 0, 0), "missed": 0,
                                       "probs": deque(maxlen=self.window), "look": looks[j]}
            else:
                track = self.tracks[ids[j]]
                step = max(1, frame - track["frame"])
                track["speed"] = tuple((new - old) / step for new, old in zip(box, track["box"]))
                track.update(box=box, frame=frame, missed=0, look=looks[j])
        for tid in [t for t in self.tracks if t not in taken and self.tracks[t]["frame"] != frame]:
            self.tracks[tid]["missed"] += 1
            if self.tracks[tid]["missed"] >= MAX_MISSED:
                del self.tracks[tid]
        return ids

    def carry(self, frame, width, height):
        """(ids, boxes) of the tracks detected at the last detection, moved on to `frame`
        (clipped to the image; boxes that left it are dropped)."""
        ids, boxes = [], []
        for tid, track in self.tracks.items():
            if track["missed"]:
                continue
            x, y, w, h = self._at(track, frame)
            x0, y0 = max(0, round(x)), max(0, round(y))
            x1, y1 = min(width, round(x + w)), min(height, round(y + h))
            if x1 - x0 >= 8 and y1 - y0 >= 8:
                ids.append(tid)
                boxes.append((x0, y0, x1 - x0, y1 - y0))
        return ids, boxes

    def smoothed(self, tid, probs):
        """Add a track's probabilities; the mean over its last `window` frames."""
        history = self.tracks[tid]["probs"]
        history.append(probs)
        return np.mean(history, axis=0)


def look(grey, box):
    """A face's look for the tracker: its box as 16x16 grey levels, standardised."""
    import cv2
    x, y, w, h = box
    patch = cv2.resize(grey[y:y + h, x:x + w], (16, 16), interpolation=cv2.INTER_AREA).astype(np.float32)
    return (patch - patch.mean()) / (patch.std() + 1e-3)


def likeness(a, b):
    """The correlation of two looks (1: the same picture); 1 when either is unknown."""
    return 1.0 if a is None or b is None else float((a * b).mean())


def thumbnail(grey):
    """A 64x48 float copy of a frame: consecutive ones far apart (CUT_CHANGE) mean a shot cut."""
    import cv2
    return cv2.resize(grey, (64, 48), interpolation=cv2.INTER_AREA).astype(np.float32)


@dataclass
class VideoSettings:
    """How videos are analysed: infer.py's video flags."""
    every: int = 1  # analyse every N-th frame
    detect_every: int = DETECT_EVERY  # detect on every K-th analysed frame, the tracker carries between
    smooth: bool = True  # label a track with the mean of its last SMOOTH_FRAMES frames
    show: bool = False  # show the annotated frames in a window
    keep_every: int = 0  # keep the crops of every N-th analysed frame with faces (Grad-CAM); 0: none


@dataclass
class Progress:
    """What the analysis of one video has done so far; finish_video writes its summary from it."""
    source: object  # a file's path or a camera index
    name: str
    fps: float
    announced: int  # the frame count the file's header announces (0: unknown, or a camera)
    analysed: int = 0
    last: tuple = None  # (frame index, seconds) of the last analysed frame
    interrupted: bool = False
    stopped: str = None  # why reading stopped short of the announced end
    started: float = field(default_factory=time.monotonic)
    timing: dict = field(default_factory=lambda: dict.fromkeys(("read", "detect", "classify", "write"), 0.0))
    annotated: bool = False  # whether annotated.mp4 is being (or was) written whole
    with_faces: int = 0  # analysed frames that had faces
    cuts: list = field(default_factory=list)  # times (s) of the shot cuts found
    kept: list = field(default_factory=list)  # (frame name, crops, probabilities), see keep_every

    @property
    def camera(self):
        return isinstance(self.source, int)


def read_frames(cap, every, camera, fps):
    """(frame index, time in seconds, BGR frame) of every `every`-th frame; skipped frames are
    only grabbed (demuxed and decoded, not converted). Stops at the first frame that cannot be
    read. A file's time is the frame's own timestamp, right for variable frame rates too (phone
    videos), or index / fps where the file gives none; a camera's is the wall clock since its
    first frame."""
    import time

    import cv2
    index, start = 0, None
    while True:
        ok, frame = cap.read()
        if not ok or frame is None:
            return
        if camera:
            start = time.monotonic() if start is None else start
            seconds = time.monotonic() - start
        else:
            stamp = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000
            seconds = stamp if stamp > 0 or index == 0 else index / fps
        yield index, seconds, frame
        for _ in range(every - 1):
            index += 1
            if not cap.grab():
                return
        index += 1


def open_preview():
    """An OpenCV window for --show, or None (with a note) where OpenCV has no GUI."""
    import cv2
    try:
        cv2.namedWindow("infer.py --show", cv2.WINDOW_NORMAL)
        return "infer.py --show"
    except cv2.error:
        warn("--show: this OpenCV has no GUI support (opencv-python-headless?); no preview window, "
             "the files are written as usual (pip install opencv-python for a window)")
        return None


def face_boxes(tracker, detector, grey, frame, detect_every=DETECT_EVERY, cut=False):
    """(track ids, boxes) in analysed frame number `frame`: detected on every `detect_every`-th
    frame, carried by the tracker in between. At a shot `cut` every track ends and the frame is
    searched afresh: no box is carried onto the new picture."""
    if cut:
        tracker.end_all()
    if cut or frame % detect_every == 0:
        boxes = detector.detect(grey)
        return tracker.update(boxes, frame, [look(grey, box) for box in boxes]), boxes
    return tracker.carry(frame, grey.shape[1], grey.shape[0])


def classify_video(source, name, predict_faces, out_dir, settings=None, detector=None, log=print):
    """Find, track and classify the faces of a video file or camera; write into out_dir:
    frames.csv (one row per face per analysed frame, a 'no face' row for a frame without one;
    flushed frame by frame), annotated.mp4 (at the analysed frame rate), timeline.png and
    summary.json. `settings` (VideoSettings) says which frames are analysed and searched for faces
    (`detector`, default Haar on a copy VIDEO_DETECT_SIDE pixels across); all faces of a frame
    are classified in one batch.

    Ctrl-C finishes the files for the frames analysed so far; for a file it is raised again
    (the command stops), for a camera it is the normal end. Returns the summary dict (with
    "kept": the crops kept for Grad-CAM, see VideoSettings.keep_every); raises Skipped when the
    source cannot be opened, holds no frame or out_dir cannot be written."""
    settings = settings or VideoSettings()
    detector = detector or face_detector(side=VIDEO_DETECT_SIDE, strictness=VIDEO_STRICTNESS)
    cap, fps, announced = open_video(source)
    progress = Progress(source, name, fps, announced)
    stop = full = None
    try:
        analyse_frames(cap, progress, predict_faces, out_dir, settings, detector, log)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (utils.Terminated)
        stop, progress.interrupted = err, True
    except (OSError, UserError) as err:
        if not full_disk(err):
            raise
        full = err
    finally:
        cap.release()
    progress.annotated = progress.annotated and readable_video(os.path.join(out_dir, "annotated.mp4"))
    if full is not None:
        raise disk_full(out_dir, progress) from full
    if progress.analysed == 0 and not progress.interrupted:
        os.remove(os.path.join(out_dir, "frames.csv"))  # nothing but its header
        with contextlib.suppress(OSError):
            os.rmdir(out_dir)
        raise Skipped("has no frame that could be read (an empty or unreadable video)")
    last, every = progress.last, settings.every
    if not progress.interrupted and not progress.camera and last and cut_short(*last, every, announced, fps):
        progress.stopped = (f"stopped at frame {last[0]} ({last[1]:.2f} s) of the {announced} its "
                            "header announces: the rest could not be read (truncated or corrupt file)")
        warn(f"{source} {progress.stopped}; the readable part was processed")
    try:
        summary = finish_video(out_dir, progress, every)
    except DiskFull as err:
        raise disk_full(out_dir, progress) from err
    log(f"{name}: {progress.analysed} frame(s) analysed ({summary['frames_per_s']:.1f}/s), "
        f"{len(summary['tracks'])} track(s)"
        + "".join(f"; #{t['track']} {t['dominant']} {t['time_on_screen_s']:.1f} s"
                  for t in summary["tracks"][:5]) + f"; wrote {', '.join(summary['files'])} to {out_dir}")
    if progress.interrupted and not progress.camera:
        where = f"frame {last[0]} ({last[1]:.2f} s)" if last else "its first frame"
        warn(f"interrupted: {source} stopped after {where}; its files cover the {progress.analysed} "
             "frame(s) analysed up to there")
        raise stop
    return dict(summary, kept=progress.kept)


def readable_video(path):
    """Whether the annotated video at `path` can be read back. OpenCV's writer does not report a
    failed write (a full disk), and an MP4 cut short has no index: a file that cannot be read is
    removed (with a warning), so that no one trusts it."""
    import cv2
    if not os.path.exists(path):
        return False
    cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    readable = cap.isOpened() and cap.read()[0]
    cap.release()
    if not readable:
        os.remove(path)
        warn(f"{path} could not be finished (is the disk full?); removed")
    return readable


def disk_full(out_dir, progress):
    """The error for a disk that filled up during a video: which of its files can be trusted."""
    kept = [f"frames.csv has the rows of the {progress.analysed} frame(s) analysed (its last line may "
            "be cut short)", "annotated.mp4 is readable" if progress.annotated
            else "annotated.mp4 could not be finished (removed)"]
    missing = [f for f in ("timeline.png", "summary.json") if not os.path.exists(os.path.join(out_dir, f))]
    return DiskFull(f"the folder {out_dir} is full (no space left on device) while writing the results of "
                    f"{progress.name}: {'; '.join(kept)}" + (f"; {' and '.join(missing)} not written" if missing else ""))


def analyse_frames(cap, progress, predict_faces, out_dir, settings, detector, log):
    """The frame loop of classify_video: each analysed frame's faces are found, classified,
    drawn and written (video frame, then its frames.csv rows, flushed: an interrupted run keeps
    every analysed frame). Files are closed however it ends."""
    import csv

    import cv2
    from tqdm import tqdm
    with contextlib.ExitStack() as stack:
        try:
            os.makedirs(out_dir, exist_ok=True)
            csv_file = stack.enter_context(open(os.path.join(out_dir, "frames.csv"), "w", newline="",
                                                encoding="utf-8"))
        except OSError as err:
            raise Skipped(f"cannot write its output folder {out_dir}: {err.strerror or err}") from err
        table = csv.writer(csv_file, lineterminator="\n")
        table.writerow(frame_columns())
        preview = open_preview() if settings.show else None
        if preview:
            stack.callback(cv2.destroyWindow, preview)
        total = progress.announced // settings.every if progress.announced else None
        bar = stack.enter_context(tqdm(total=total, desc=progress.name, unit="frame", disable=progress.camera or None,
                                       file=sys.stderr, dynamic_ncols=True, leave=False))
        tracker, writer, size, second, clock = Tracker(), None, None, 0, time.perf_counter()
        before = None  # the previous analysed frame's thumbnail
        for index, seconds, frame in read_frames(cap, settings.every, progress.camera, progress.fps):
            clock = lap(progress.timing, "read", clock)
            grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
            now = thumbnail(grey)
            cut = before is not None and float(np.abs(now - before).mean()) > CUT_CHANGE
            before = now
            if cut:
                progress.cuts.append(round(seconds, 3))
            ids, boxes = face_boxes(tracker, detector, grey, progress.analysed, settings.detect_every, cut)
            clock = lap(progress.timing, "detect", clock)
            crops = np.stack([crop_face(grey, box) for box in boxes]) if boxes else None
            probs = predict_faces(crops) if boxes else np.zeros((0, len(EMOTIONS)))
            if boxes:
                if settings.keep_every and progress.with_faces % settings.keep_every == 0:
                    progress.kept.append((f"frame{index:06d}", crops, probs))
                progress.with_faces += 1
            clock = lap(progress.timing, "classify", clock)
            rows, labels = frame_rows(progress.name, index, seconds, ids, boxes, probs, tracker, settings.smooth)
            annotate(frame, labels)
            if size is None:  # the first frame gives the video's size
                size = frame.shape[1::-1]
                writer = open_writer(os.path.join(out_dir, "annotated.mp4"), progress.fps / settings.every, size)
                if writer is not None:
                    stack.callback(writer.release)
                    progress.annotated = True
            if writer is not None:
                writer.write(frame if frame.shape[1::-1] == size else cv2.resize(frame, size))
            table.writerows(rows)
            csv_file.flush()
            progress.analysed, progress.last = progress.analysed + 1, (index, seconds)
            if preview:
                cv2.imshow(preview, frame)
                if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                    raise KeyboardInterrupt
            bar.update(1)
            if progress.camera and int(seconds) > second:  # one live line per second
                second = int(seconds)
                rate = progress.analysed / max(time.monotonic() - progress.started, 1e-9)
                said = ", ".join(f"#{t} {e} {c:.0%}" for _, e, c, t in labels) or "no face"
                log(f"{seconds:6.1f} s  {len(labels)} face(s): {said}  ({rate:.1f} frames/s)")
            clock = lap(progress.timing, "write", clock)


def lap(timing, part, since):
    """Add the time since `since` to timing[part]; returns now."""
    now = time.perf_counter()
    timing[part] += now - since
    return now


def frame_rows(name, index, seconds, ids, boxes, probs, tracker, smooth):
    """One analysed frame's frames.csv rows (a 'no face' row when it has none) and its labels
    [(box, emotion, confidence, track id)] for annotate (smoothed over the track's last frames)."""
    rows, labels = [], []
    for tid, box, p in zip(ids, boxes, probs):
        best = int(p.argmax())
        rows.append([name, index, f"{seconds:.3f}", tid, *map(int, box), EMOTIONS[best],
                     f"{p[best]:.6f}", *(f"{v:.6f}" for v in p)])
        shown = tracker.smoothed(tid, p) if smooth else p
        labels.append((box, EMOTIONS[int(shown.argmax())], float(shown.max()), tid))
    if not rows:
        rows = [[name, index, f"{seconds:.3f}", "", "", "", "", "", "no face", "", *[""] * len(EMOTIONS)]]
    return rows, labels


def cut_short(last_index, last_seconds, every, announced, fps):
    """Whether reading a file stopped well before the end its header announces. Both the frame
    index and the time must fall short: MKV and WebM headers hold no frame count, and the one
    estimated from their duration can be too high for a variable frame rate, while the time of
    their last frame still reaches that duration (announced / fps)."""
    return bool(announced) and (last_index + every < announced * 0.99
                                and last_seconds + every / fps < announced / fps * 0.99)


def open_writer(path, fps, size):
    """A cv2.VideoWriter for MP4 (mp4v), or None (with a warning that says why)."""
    import cv2
    if min(size) < 2:  # MPEG-4 encodes no 1-pixel side
        warn(f"{path}: frames of {size[0]}x{size[1]} pixels are too small to encode as MP4; "
             "no annotated video")
        return None
    if not is_utf8(path):  # OpenCV's writer crashes on such names
        warn(f"{printable(path)}: a folder name in it is not valid UTF-8, which OpenCV cannot write; "
             "no annotated video (choose another -o)")
        return None
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), max(fps, 0.1), size)
    if not writer.isOpened():
        warn(f"{path}: could not open a video writer (no MP4 encoder?); no annotated video")
        return None
    return writer


def read_frames_table(path):
    """frames.csv as a DataFrame; the face rows only (no 'no face' rows)."""
    import pandas as pd
    table = pd.read_csv(path, keep_default_na=False, na_values={"track": [""]})
    return table[table["emotion"] != "no face"].astype({"track": int})


def track_summaries(faces, interval, every):
    """Per track, longest on screen first: time on screen, first and last time, the share of
    frames with each emotion and the dominant emotion (raw labels). Each analysed frame of the
    track counts for the time to the next analysed frame when the track is seen there too (its
    real spacing, right for variable frame rates), else for the nominal `interval`."""
    out = []
    for tid, rows in faces.groupby("track"):
        shares = rows["emotion"].value_counts(normalize=True)
        spacing = np.diff(rows["time_s"].to_numpy(float))[np.diff(rows["frame"].to_numpy()) == every]
        out.append({"track": int(tid), "frames": len(rows),
                    "time_on_screen_s": round(spacing.sum() + (len(rows) - len(spacing)) * interval, 3),
                    "first_s": float(rows["time_s"].min()), "last_s": float(rows["time_s"].max()),
                    "emotions": {n: round(float(shares.get(n, 0.0)), 4) for n in EMOTIONS},
                    "dominant": shares.index[0]})
    return sorted(out, key=lambda t: (-t["frames"], t["track"]))


def save_timeline(faces, tracks, every, title, path):
    """timeline.png: per track (the TIMELINE_TRACKS longest), its seven probabilities against
    time in the emotions' colours; a gap where the track was not seen."""
    from matplotlib.figure import Figure
    shown = tracks[:TIMELINE_TRACKS]
    fig = Figure(figsize=(9, 0.6 + 1.7 * max(1, len(shown))))
    axes = np.atleast_1d(fig.subplots(max(1, len(shown)), 1, sharex=True, squeeze=False)[:, 0])
    for ax, track in zip(axes, shown):
        rows = faces[faces["track"] == track["track"]]
        t = rows["time_s"].to_numpy(float)
        gaps = np.flatnonzero(np.diff(rows["frame"].to_numpy()) > every) + 1  # NaN breaks the line there
        for name in EMOTIONS:
            b, g, r = EMOTION_COLOURS[name]
            p = rows[f"p_{name}"].to_numpy(float)
            ax.plot(np.insert(t, gaps, np.nan), np.insert(p, gaps, np.nan), color=(r / 255, g / 255, b / 255),
                    lw=1.4, label=name)
        ax.set_ylim(0, 1)
        ax.set_ylabel("probability", fontsize=8)
        ax.set_title(f"track #{track['track']}: {track['time_on_screen_s']:.1f} s on screen, mostly "
                     f"{track['dominant']}", fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    if not shown:
        axes[0].text(0.5, 0.5, "no face found", ha="center", va="center", transform=axes[0].transAxes)
    else:
        axes[0].legend(ncol=7, fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.18), frameon=False)
    if len(tracks) > len(shown):
        title += f" ({len(tracks) - len(shown)} shorter track(s) not shown)"
    axes[-1].set_xlabel("time (s)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def finish_video(out_dir, progress, every):
    """timeline.png and summary.json, both from frames.csv as written (so they agree with it)."""
    table = read_frames_table(os.path.join(out_dir, "frames.csv"))
    elapsed = time.monotonic() - progress.started
    # A camera's analysed rate is what the machine kept up with; a file's is set by `every`.
    interval = elapsed / max(1, progress.analysed) if progress.camera else every / progress.fps
    tracks = track_summaries(table, interval, every)
    save_timeline(table, tracks, every, f"{progress.name}: emotion probabilities per tracked face",
                  os.path.join(out_dir, "timeline.png"))
    total = sum(progress.timing.values()) or 1.0
    last = progress.last
    summary = {"video": progress.source if progress.camera else os.fspath(progress.source),
               "camera": progress.camera, "fps": progress.fps, "every": every, "analysed_fps": 1 / interval,
               "frames_analysed": progress.analysed, "frames_announced": progress.announced or None,
               "last_frame": last[0] if last else None, "last_time_s": last[1] if last else None,
               "stopped_early": progress.stopped, "interrupted": progress.interrupted, "cuts_s": progress.cuts,
               "frames_per_s": progress.analysed / max(elapsed, 1e-9), "seconds": round(elapsed, 3),
               "time_share": {k: round(v / total, 4) for k, v in progress.timing.items()},
               "tracks": tracks, "files": {f: os.path.join(out_dir, f) for f in VIDEO_FILES
                                           if f != "annotated.mp4" or progress.annotated}}
    save_json(summary, os.path.join(out_dir, "summary.json"))
    return summary


def classify_videos(inputs, predict_faces, out_dir, settings=None, detector=None, log=print, reserved=()):
    """classify_video for each video file (folders: their videos) or camera index in `inputs`,
    each into out_dir/<video name>/ (<video name>_2, ... where two share a name or it is one of
    the `reserved` folder names). A video that cannot be used is named in one warning line and
    the others are still processed. Returns the summaries (each with its "folder"); raises
    UserError when not one video
    could be processed, and KeyboardInterrupt (after finishing the files) on Ctrl-C in a file."""
    sources, skipped = find_videos(inputs)
    for path, reason in skipped:
        warn(f"{printable(path)} {reason}; skipped")
    detector = detector or face_detector(side=VIDEO_DETECT_SIDE, strictness=VIDEO_STRICTNESS)
    summaries, used = [], {name.lower() for name in reserved}
    for source, name in sources:
        folder = name
        k = 1
        while folder.lower() in used:
            k += 1
            folder = f"{name}_{k}"
        used.add(folder.lower())
        try:
            summary = classify_video(source, name, predict_faces, os.path.join(out_dir, folder),
                                     settings, detector, log)
            summaries.append(dict(summary, folder=os.path.join(out_dir, folder)))
        except Skipped as why:
            what = f"camera {source}" if isinstance(source, int) else printable(source)
            warn(f"{what} {why}; skipped")
            skipped.append((source, str(why)))
    if not summaries:
        given = ", ".join(map(str, inputs))
        raise UserError(f"nothing could be processed: no usable video in {given}"
                        + ("" if sources or skipped else " (no video files found)"))
    if skipped:
        log(f"{len(summaries)} video(s) processed, {len(skipped)} skipped")
    return summaries
