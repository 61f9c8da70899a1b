"""infer.py --video: per-frame rows, tracks, the annotated video, timeline and summary, and bad
inputs; all on small clips made here from a real face photo (skimage's astronaut)."""
import json
import os

import cv2
import numpy as np
import pandas as pd
import pytest

import utils
import faces
import video
from tests.test_infer import random_model, run_cli, save_checkpoint
from tools.bench_video import make_clip

FPS = 10.0
FRAMES = 16
EMPTY = (3, 3)  # frames without a face at the start and at the end
SIZE = (320, 240)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "a_best.pth", random_model(0))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(path, true face boxes per frame) of a 16-frame 320x240 clip, one moving face."""
    path = tmp_path_factory.mktemp("clips") / "interview.mp4"
    return str(path), make_clip(path, FRAMES, 1, SIZE, FPS, EMPTY)


def count_frames(path):
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def run_video(args, ckpt, out, capsys):
    return run_cli(["-c", ckpt, "--video", *map(str, args), "-o", str(out), "--device", "cpu"], capsys)


# ----------------------------------------------------------------------------- a good clip

def test_clip_gives_rows_times_one_track_video_timeline_and_summary(ckpt, clip, tmp_path, capsys):
    path, truth = clip
    out = tmp_path / "out"
    code, stdout, err = run_video([path, "--detect_every", "1"], ckpt, out, capsys)
    assert code == 0, err
    folder = out / "interview"
    table = pd.read_csv(folder / "frames.csv", keep_default_na=False)
    assert list(table.columns) == video.frame_columns()
    assert sorted(set(table["frame"])) == list(range(FRAMES))  # every frame, once per face
    assert not table.duplicated(["frame", "track"]).any()
    np.testing.assert_allclose(table["time_s"], table["frame"] / FPS, atol=1e-3)
    rows = table[table["emotion"] != "no face"]  # (`faces` is the module)
    assert sorted(rows["frame"]) == [k for k, boxes in enumerate(truth) if boxes]
    assert (table[table["emotion"] == "no face"]["track"] == "").all()
    assert rows["track"].nunique() == 1  # the face keeps its id
    for (_, row), boxes in zip(rows.iterrows(), [b for b in truth if b]):
        assert faces.overlap([int(row[k]) for k in "xywh"], boxes[0]) > 0.5
    probs = rows[[f"p_{n}" for n in utils.EMOTIONS]].astype(float).to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
    assert list(rows["emotion"]) == [utils.EMOTIONS[i] for i in probs.argmax(1)]
    assert count_frames(folder / "annotated.mp4") == FRAMES
    assert cv2.imread(str(folder / "timeline.png")) is not None
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["frames_analysed"] == FRAMES and not summary["interrupted"]
    assert not summary["stopped_early"]
    (track,) = summary["tracks"]
    assert track["frames"] == len(rows)
    assert track["time_on_screen_s"] == pytest.approx(len(rows) / FPS)
    shares = rows["emotion"].value_counts(normalize=True)
    assert track["emotions"] == {n: pytest.approx(shares.get(n, 0), abs=1e-4) for n in utils.EMOTIONS}
    assert track["dominant"] == shares.index[0]
    assert "interview: 16 frame(s) analysed" in stdout and "Traceback" not in err


def test_every_nth_frame_default_tracking_and_show_without_gui(ckpt, clip, tmp_path, capsys):
    path, truth = clip
    out = tmp_path / "out"
    code, _, err = run_video([path, "--every", "3", "--show"], ckpt, out, capsys)
    assert code == 0, err
    table = pd.read_csv(out / "interview" / "frames.csv", keep_default_na=False)
    assert sorted(set(table["frame"])) == list(range(0, FRAMES, 3))
    np.testing.assert_allclose(table["time_s"], table["frame"] / FPS, atol=1e-3)
    faces = table[table["emotion"] != "no face"]
    assert faces["track"].nunique() == 1 and len(faces) >= 3
    assert count_frames(out / "interview" / "annotated.mp4") == len(range(0, FRAMES, 3))
    if cv2.getBuildInformation().split("GUI:")[1].split()[0] == "NONE":
        assert "--show" in err and "no GUI support" in err


def test_tracker_keeps_ids_and_smooths():
    tracker = video.Tracker(window=3)
    assert tracker.update([(10, 10, 50, 50), (200, 10, 50, 50)], 0) == [1, 2]
    assert tracker.update([(206, 12, 50, 50), (14, 11, 52, 50)], 1) == [2, 1]  # moved, reordered
    ids, boxes = tracker.carry(2, 400, 300)  # between detections: moved on at their speed
    assert ids == [1, 2] and boxes[0][0] == 18 and boxes[1][0] == 212
    assert tracker.update([(300, 200, 40, 40)], 2) == [3]  # a new face far away
    for frame in range(3, 3 + video.MAX_MISSED):
        tracker.update([], frame)
    assert tracker.update([(22, 12, 52, 50)], 20) == [4]  # gone too long: a new id
    for p, mean in (([1, 0], [1, 0]), ([0, 1], [.5, .5]), ([0, 1], [1 / 3, 2 / 3]), ([0, 1], [0, 1])):
        np.testing.assert_allclose(tracker.smoothed(4, np.array(p, float)), mean)


class FakeFile:
    """A video file as cv2.VideoCapture reads it: frames with the given timestamps (ms)."""

    def __init__(self, stamps_ms):
        self.stamps, self.position = stamps_ms, -1

    def read(self):
        self.position += 1
        return (True, np.zeros((4, 4, 3), np.uint8)) if self.position < len(self.stamps) else (False, None)

    def grab(self):
        return self.read()[0]

    def get(self, prop):
        assert prop == cv2.CAP_PROP_POS_MSEC
        return self.stamps[self.position]


def test_a_variable_frame_rate_file_gets_its_frames_own_times():
    """A phone video that slows from 30 to 15 frames/s: the times are the frames' timestamps,
    not index / average fps; a file without timestamps falls back to index / fps."""
    stamps = [1000 * i / 30 for i in range(30)] + [1000 + 1000 * i / 15 for i in range(15)]
    got = [(i, t) for i, t, _ in video.read_frames(FakeFile(stamps), 2, False, 22.5)]
    assert got == [(i, stamps[i] / 1000) for i in range(0, 45, 2)]
    no_stamps = [t for _, t, _ in video.read_frames(FakeFile([0.0] * 5), 1, False, 10.0)]
    assert no_stamps == [0.0, 0.1, 0.2, 0.3, 0.4]


def test_time_on_screen_follows_the_frames_own_spacing():
    """Frames at 30, then 15 frames/s, the face gone for frames 4-5: each frame counts for the
    time to the next frame when the face is seen there too, else for the nominal interval."""
    table = pd.DataFrame({"track": 1, "frame": [0, 1, 2, 3, 6, 7], "emotion": "Happy",
                          "time_s": np.array([0, 1, 2, 4, 10, 12]) / 30})
    [track] = video.track_summaries(table, 1 / 30, 1)
    assert track["time_on_screen_s"] == round((1 + 1 + 2 + 2) / 30 + 2 / 30, 3)  # frames 3, 7: nominal


def test_a_file_is_called_cut_short_only_when_its_frames_and_time_both_stop_early():
    fps = 30.0
    assert video.cut_short(149, 4.97, 1, 300, fps)  # stopped half-way: truncated
    assert not video.cut_short(299, 9.97, 1, 300, fps)  # read to the end
    # MKV at a variable frame rate: 300 frames estimated from 10 s x 30 fps, 240 in the file,
    # the last one at 9.96 s: complete.
    assert not video.cut_short(239, 9.96, 1, 300, fps)
    assert not video.cut_short(10, 0.33, 1, 0, fps)  # no count announced: nothing to compare


# ----------------------------------------------------------------------------- bad inputs

def test_bad_videos_are_named_and_the_good_one_still_processed(ckpt, clip, tmp_path, capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    (folder / "good.mp4").write_bytes(open(clip[0], "rb").read())
    (folder / "notes.mp4").write_text("not a video")
    (folder / "empty.mp4").write_bytes(b"")
    for name, fourcc in (("zero.mp4", "mp4v"), ("zero.avi", "MJPG")):  # opened, closed: no frame
        cv2.VideoWriter(str(folder / name), cv2.VideoWriter_fourcc(*fourcc), FPS, SIZE).release()
    make_clip(tmp_path / "full.avi", 20, 1, SIZE, FPS, EMPTY, fourcc="MJPG")
    data = (tmp_path / "full.avi").read_bytes()
    (folder / "cut.avi").write_bytes(data[: len(data) * 6 // 10])
    cut_mp4 = open(clip[0], "rb").read()
    (folder / "cut.mp4").write_bytes(cut_mp4[: len(cut_mp4) // 2])  # its index was at the end
    out = tmp_path / "out"
    code, stdout, err = run_video([folder, 9, tmp_path / "missing.mp4"], ckpt, out, capsys)
    assert code == 0, err
    assert "Traceback" not in err and "Traceback" not in stdout
    lines = err.strip().splitlines()
    said = {name: [line for line in lines if name in line] for name in
            ("notes.mp4", "empty.mp4", "zero.mp4", "zero.avi", "cut.mp4", "cut.avi", "camera 9",
             "missing.mp4")}
    for name, found in said.items():
        assert len(found) == 1, (name, err)
    assert "could not be opened as a video" in said["notes.mp4"][0]
    assert "zero-byte" in said["empty.mp4"][0]
    assert "no frame" in said["zero.avi"][0]
    assert "no camera" in said["camera 9"][0]
    assert "truncated" in said["cut.mp4"][0]
    assert "stopped at frame" in said["cut.avi"][0] and "readable part was processed" in said["cut.avi"][0]
    good = pd.read_csv(out / "good" / "frames.csv")
    assert sorted(set(good["frame"])) == list(range(FRAMES))
    cut = pd.read_csv(out / "cut" / "frames.csv")
    read = sorted(set(cut["frame"]))
    assert read == list(range(len(read))) and 0 < len(read) < 20  # the readable part
    summary = json.loads((out / "cut" / "summary.json").read_text())
    assert "stopped at frame" in summary["stopped_early"]
    assert count_frames(out / "cut" / "annotated.mp4") == len(read)


def test_earlier_results_inside_a_searched_folder_are_not_taken_for_videos(ckpt, clip, tmp_path, capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    (folder / "interview.mp4").write_bytes(open(clip[0], "rb").read())
    for k in (1, 2):  # the second call finds out1/interview/annotated.mp4: not a new video
        code, stdout, err = run_video([folder, "--every", "4"], ckpt, folder / f"out{k}", capsys)
        assert code == 0, err
        assert sorted(p.name for p in (folder / f"out{k}").iterdir()) == ["interview"]
    assert "holds the results of an earlier call" in err


def test_nothing_usable_is_one_error(ckpt, tmp_path, capsys):
    code, _, err = run_video([9], ckpt, tmp_path / "out", capsys)  # no camera in this sandbox
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: nothing could be processed")
    assert "Traceback" not in err


def test_unwritable_output_folders(ckpt, clip, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should be")
    code, _, err = run_video([clip[0]], ckpt, blocker / "out", capsys)
    assert code == 2 and err.startswith("error: cannot write to") and len(err.strip().splitlines()) == 1
    # One video's own folder cannot be made: that video is skipped, the other one processed.
    # (infer.py would take out_2, out being not empty: the folder is blocked after the check.)
    out = tmp_path / "out"
    out.mkdir()
    (out / "interview").write_text("in the way")
    other = tmp_path / "other.mp4"
    other.write_bytes(open(clip[0], "rb").read())
    summaries = video.classify_videos([clip[0], str(other)], lambda crops: np.full((len(crops), 7), 1 / 7),
                                      str(out), log=lambda message: None)
    assert [s["folder"] for s in summaries] == [str(out / "other")]
    assert "cannot write its output folder" in capsys.readouterr().err
    assert (out / "other" / "summary.json").exists()


def test_ctrl_c_mid_video_finishes_the_files(ckpt, clip, tmp_path, interrupt_annotate, capsys):
    interrupt_annotate(video, 8)
    other = tmp_path / "later.mp4"
    other.write_bytes(open(clip[0], "rb").read())
    out = tmp_path / "out"
    code, _, err = run_video([clip[0], other, "--detect_every", "1"], ckpt, out, capsys)
    assert code == 130
    assert "interrupted" in err and "stopped after frame 6 (0.60 s)" in err and "Traceback" not in err
    folder = out / "interview"
    table = pd.read_csv(folder / "frames.csv", keep_default_na=False)
    assert sorted(set(table["frame"])) == list(range(7))  # the 7 frames done, none twice
    assert count_frames(folder / "annotated.mp4") == 7
    assert cv2.imread(str(folder / "timeline.png")) is not None
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["interrupted"] and summary["frames_analysed"] == 7
    assert summary["tracks"][0]["frames"] == (table["emotion"] != "no face").sum()
    assert not (out / "later").exists()  # Ctrl-C stops the command


def test_camera_prints_a_line_per_second_and_ctrl_c_ends_it_normally(ckpt, clip, tmp_path, monkeypatch,
                                                                       capsys):
    """Camera 0 is played by the clip (there is no camera here); frames take 0.1 s each."""
    import time
    real_open, real_annotate, calls = video.open_video, faces.annotate, []
    monkeypatch.setattr(video, "open_video", lambda source: real_open(clip[0] if source == 0 else source))

    def slow_annotate(image, faces, legend=True):
        calls.append(1)
        if len(calls) == 13:
            raise KeyboardInterrupt  # Ctrl-C: how a camera run ends
        time.sleep(0.1)
        return real_annotate(image, faces, legend)
    monkeypatch.setattr(video, "annotate", slow_annotate)
    out = tmp_path / "out"
    code, stdout, err = run_video([0], ckpt, out, capsys)
    assert code == 0, err
    live = [line for line in stdout.splitlines() if "frames/s)" in line]
    assert live and "face(s)" in live[0]
    table = pd.read_csv(out / "camera0" / "frames.csv", keep_default_na=False)
    assert sorted(set(table["frame"])) == list(range(12))
    assert (np.diff(table.drop_duplicates("frame")["time_s"]) > 0.05).all()  # the wall clock
    summary = json.loads((out / "camera0" / "summary.json").read_text())
    assert summary["camera"] and summary["interrupted"] and summary["frames_analysed"] == 12
    assert count_frames(out / "camera0" / "annotated.mp4") == 12


def test_explain_on_video_maps_every_nth_frame_with_faces(ckpt, clip, tmp_path, capsys):
    path, truth = clip
    out = tmp_path / "out"
    code, stdout, err = run_video([path, "--detect_every", "1", "--explain", "--explain_every", "4"],
                              ckpt, out, capsys)
    assert code == 0, err
    cams = out / "interview" / "cams"
    with_faces = [k for k, boxes in enumerate(truth) if boxes]
    expected = [f"frame{k:06d}_face0_cam.png" for k in with_faces[::4]]
    assert sorted(p.name for p in cams.glob("*_cam.png")) == expected
    for name in expected:
        assert cv2.imread(str(cams / name)) is not None
        assert cv2.imread(str(cams / name.replace("_cam", "")), cv2.IMREAD_UNCHANGED).shape == (48, 48)
    assert (out / "interview" / "explain_grid.png").exists()


def test_a_split_report_beside_videos_keeps_its_folder_from_a_video_named_report(ckpt, clip, tmp_path, capsys):
    import synthetic
    csv = synthetic.write_synthetic_csv(tmp_path / "faces.csv", 7, 7, 7, seed=1)
    named = tmp_path / "report.mp4"
    named.write_bytes(open(clip[0], "rb").read())
    code, _, err = run_video([named, "-d", csv], ckpt, tmp_path / "out", capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "report" / "metrics.json").exists()
    assert not (tmp_path / "out" / "report" / "frames.csv").exists()
    assert (tmp_path / "out" / "report_2" / "frames.csv").exists()


def test_video_flags_without_video_are_refused(ckpt, tmp_path, capsys):
    code, _, err = run_cli(["-c", ckpt, "--images", str(tmp_path), "--every", "5", "--show"], capsys)
    assert code == 2 and "--every, --show apply to --video only" in err


# ----------------------------------------------------------------------------- shot cuts

def two_shot_clip(path, frames_each=8):
    """Two shots joined by a hard cut: the astronaut's head on a light gradient, then her mirrored,
    darker head on a dark background, at nearly the same place (so position alone would carry the
    track over). Returns the index of the first frame after the cut."""
    import skimage.data
    from tools.bench_video import HEAD
    head = np.ascontiguousarray(skimage.data.astronaut()[HEAD[0]:HEAD[1], HEAD[2]:HEAD[3], ::-1])
    light = np.full((240, 320, 3), 190, np.uint8)
    dark = np.full((240, 320, 3), 30, np.uint8)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, SIZE)
    for t in range(2 * frames_each):
        if t < frames_each:
            frame = light.copy()
            frame[10:240, 60 + t:270 + t] = head
        else:
            frame = dark.copy()
            frame[12:242 - 2, 64 + t:274 + t] = (head[:-2, ::-1] * 0.8).astype(np.uint8)
        writer.write(frame)
    writer.release()
    return frames_each


def test_a_hard_cut_ends_every_track(ckpt, tmp_path, capsys):
    path = tmp_path / "cut.mp4"
    first_after = two_shot_clip(path)
    code, _, err = run_video([path, "--detect_every", "3"], ckpt, tmp_path / "out", capsys)
    assert code == 0, err
    table = pd.read_csv(tmp_path / "out" / "cut" / "frames.csv", keep_default_na=False)
    faces_rows = table[table["emotion"] != "no face"]
    before = set(faces_rows[faces_rows["frame"] < first_after]["track"])
    after = set(faces_rows[faces_rows["frame"] >= first_after]["track"])
    assert before and after and not before & after, (before, after)  # no track spans the cut
    summary = json.loads((tmp_path / "out" / "cut" / "summary.json").read_text())
    assert summary["cuts_s"] == [pytest.approx(first_after / FPS, abs=0.01)]


def test_a_track_does_not_pass_to_a_face_that_looks_different_or_jumps_in_size():
    grey = np.zeros((200, 200), np.uint8)
    grey[20:80, 20:80] = np.tile(np.linspace(0, 255, 60, dtype=np.uint8), (60, 1))  # a left-to-right ramp
    other = grey.copy()
    other[20:80, 20:80] = other[20:80, 20:80].T  # the same box, a top-to-bottom ramp
    tracker = video.Tracker()
    box = (20, 20, 60, 60)
    [first] = tracker.update([box], 0, [video.look(grey, box)])
    assert tracker.update([box], 1, [video.look(grey, box)]) == [first]  # the same face goes on
    assert tracker.update([box], 2, [video.look(other, box)]) != [first]  # another look: a new track
    tracker = video.Tracker()
    [first] = tracker.update([box], 0)
    assert tracker.update([(10, 10, 100, 100)], 1) != [first]  # 1.7x larger: a new track
