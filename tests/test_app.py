"""app.py, the web page: started on a free loopback port inside the tests and driven like any API
through gradio_client (photo, video, bad files, two users, the files it serves), plus one real
browser (headless Chromium through Playwright) that drops a photo on the page and turns on the
camera. Pictures: skimage's astronaut and clips made from it, written under tmp_path."""
import json
import os
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("gradio", reason="the web page needs Gradio: pip install -r requirements-app.txt")
from gradio_client import Client, handle_file  # noqa: E402

import app  # noqa: E402
import faces  # noqa: E402
import photos  # noqa: E402
import predict  # noqa: E402
import video  # noqa: E402
from tools import app_browser  # noqa: E402
from tools.bench_video import make_clip, read_all  # noqa: E402
from utils import EMOTIONS  # noqa: E402

MAX_MB = 1  # the test page's upload limit: a bigger file tests the refusal
PHOTO_OUTPUTS = ("annotated", "faces", "chart", "csv", "message")
VIDEO_OUTPUTS = ("video", "timeline", "tracks", "frames", "mp4", "message")

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # Gradio's own queue statistics under pandas 3 (not this project's code):
              pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def models():
    return predict.load_models(predict.DEFAULT_CHECKPOINT)  # the shipped model: the astronaut is Happy


@pytest.fixture(scope="module")
def served(models, tmp_path_factory):
    """The page on a free loopback port, its files under a tmp_path folder; every outgoing
    connection the process attempts meanwhile is recorded (`connections`)."""
    connections, connect = [], socket.socket.connect

    def recording(sock, address):
        connections.append(address)
        return connect(sock, address)
    saved = {k: os.environ.get(k) for k in ("GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE")}
    saved_tempdir = tempfile.tempdir  # gradio_client leaves an empty folder there per download
    tempfile.tempdir = str(tmp_path_factory.mktemp("temp"))
    socket.socket.connect = recording
    root = tmp_path_factory.mktemp("app")
    port = app_browser.free_port()
    page = app.open_page(models, "cpu", root)
    demo = app.serve(page, "Model: the shipped one", port=port, max_file_mb=MAX_MB, block=False,
                     private=[os.path.dirname(predict.DEFAULT_CHECKPOINT)])
    try:
        yield type("Served", (), dict(url=f"http://127.0.0.1:{port}/", page=page, root=str(root),
                                      connections=connections))
    finally:
        demo.close()
        socket.socket.connect = connect
        tempfile.tempdir = saved_tempdir
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_client(url, downloads):
    """gradio_client with its downloads under `downloads`, no analytics, and patience for a
    loaded machine (httpx's default is 5 s)."""
    return Client(url, download_files=str(downloads), verbose=False, analytics_enabled=False,
                  httpx_kwargs={"timeout": 120})


@pytest.fixture(scope="module")
def client(served, tmp_path_factory):
    return make_client(served.url, tmp_path_factory.mktemp("downloads"))


@pytest.fixture(scope="module")
def astronaut_jpg(tmp_path_factory):
    return app_browser.astronaut_jpg(str(tmp_path_factory.mktemp("photo")))


def ask_photo(client, path, gradcam=False):
    return dict(zip(PHOTO_OUTPUTS, client.predict(handle_file(str(path)), gradcam, api_name="/photo")))


def ask_video(client, path):
    return dict(zip(VIDEO_OUTPUTS, client.predict(handle_file(str(path)), api_name="/video")))


def table_rows(table):
    return [dict(zip(table["headers"], row)) for row in table["data"]]


# ----------------------------------------------------------------------------- photo

def test_photo_equals_detect_emotions_and_the_command_line(client, models, astronaut_jpg, tmp_path):
    got = ask_photo(client, astronaut_jpg)
    want = predict.detect_emotions(models, astronaut_jpg)
    assert len(want) == 1 and want[0]["emotion"] == "Happy"
    rows = table_rows(got["faces"])
    assert [(r["x"], r["y"], r["w"], r["h"]) for r in rows] == [f["box"] for f in want]
    assert [r["emotion"] for r in rows] == [f["emotion"] for f in want]
    assert [r["confidence"] for r in rows] == [f["confidence"] for f in want]
    assert [[r[f"p_{n}"] for n in EMOTIONS] for r in rows] == [[f["emotions"][n] for n in EMOTIONS]
                                                               for f in want]
    assert "1 face(s): face 0: Happy" in got["message"]
    # The same files as `infer.py --images`: faces.csv (but for the file names) and the picture.
    out = tmp_path / "cli"
    photos.classify_photos([astronaut_jpg], lambda crops: predict.predict(models, crops), str(out),
                           log=lambda message: None)
    page_csv, cli_csv = pd.read_csv(got["csv"]), pd.read_csv(out / "faces.csv")
    assert list(page_csv.columns) == list(cli_csv.columns)
    pd.testing.assert_frame_equal(page_csv.drop(columns=["file", "annotated"]),
                                  cli_csv.drop(columns=["file", "annotated"]))
    assert page_csv["file"].tolist() == ["astronaut.jpg"]
    with open(got["annotated"], "rb") as page_copy:
        assert page_copy.read() == (out / "annotated" / "astronaut.jpg").read_bytes()
    assert got["chart"] is not None


def test_gradcam_switch_paints_the_faces_only(client, models, astronaut_jpg):
    plain = cv2.imread(ask_photo(client, astronaut_jpg)["annotated"]).astype(int)
    painted = cv2.imread(ask_photo(client, astronaut_jpg, gradcam=True)["annotated"]).astype(int)
    x, y, w, h = predict.detect_emotions(models, astronaut_jpg)[0]["box"]
    extra = round(faces.FACE_MARGIN * max(w, h)) + 16  # the crop's margin, and JPEG's 8x8 blocks
    inside = np.abs(painted - plain)[y:y + h, x:x + w].mean()
    outside = np.abs(painted - plain)
    outside[max(0, y - extra):y + h + extra, max(0, x - extra):x + w + extra] = 0
    assert inside > 20 and outside.mean() < 0.1


def test_photo_without_a_face_says_so(client, tmp_path):
    path = tmp_path / "wall.png"
    cv2.imwrite(str(path), np.full((120, 160, 3), 128, np.uint8))
    got = ask_photo(client, path)
    assert "no face found" in got["message"] and got["faces"]["data"] == []
    assert pd.read_csv(got["csv"])["emotion"].tolist() == ["no face"]


# ----------------------------------------------------------------------------- video

def test_video_equals_the_command_line_and_plays_in_a_browser(client, models, tmp_path):
    path = tmp_path / "interview.mp4"
    make_clip(path, 16, 1, (320, 240), 10.0, (3, 3))
    got = ask_video(client, path)
    assert "16 frames analysed" in got["message"] and "1 tracked face" in got["message"]
    # What `infer.py --video` writes for the same file.
    summary = video.classify_video(str(path), "interview", lambda crops: predict.predict(models, crops),
                                    str(tmp_path / "cli"), log=lambda message: None)
    pd.testing.assert_frame_equal(pd.read_csv(got["frames"], keep_default_na=False),
                                  pd.read_csv(tmp_path / "cli" / "frames.csv", keep_default_na=False))
    (track,) = table_rows(got["tracks"])
    (want,) = summary["tracks"]
    assert (track["frames"], track["mostly"]) == (want["frames"], want["dominant"])
    assert got["video"].endswith(".webm")  # what browsers play (the MP4 is mp4v)
    assert len(read_all(got["video"])) == len(read_all(got["mp4"])) == 16
    assert cv2.imread(got["timeline"]) is not None


def test_video_without_faces_says_so(client, tmp_path):
    path = tmp_path / "empty_room.mp4"
    make_clip(path, 6, 0, (160, 120), 10.0, (0, 0))
    got = ask_video(client, path)
    assert "no face found in any frame" in got["message"] and got["tracks"]["data"] == []
    assert set(pd.read_csv(got["frames"])["emotion"]) == {"no face"}


def test_video_without_an_annotated_mp4_still_gives_its_table(models, monkeypatch, tmp_path):
    monkeypatch.setattr(video, "open_writer", lambda *args: None)  # as when OpenCV has no MP4 encoder
    path = tmp_path / "interview.mp4"
    make_clip(path, 8, 1, (320, 240), 10.0, (3, 3))
    page = app.Page(models, "cpu", str(tmp_path / "page"))
    os.makedirs(page.folder)
    shown, timeline, tracks, frames, mp4, message = app.video(page, str(path))
    assert shown is None and mp4 is None and "No annotated video could be written" in message
    assert "8 frames analysed" in message and len(tracks.data) == 1
    assert len(pd.read_csv(frames)) == 8 and cv2.imread(timeline) is not None


# ----------------------------------------------------------------------------- bad input, load, safety

def test_bad_files_get_a_message_and_the_server_keeps_serving(client, astronaut_jpg, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    damaged = tmp_path / "damaged.jpg"
    with open(astronaut_jpg, "rb") as f:
        damaged.write_bytes(f.read()[:20_000])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path, reason in ((text, "is not an image"), (damaged, "could not be decoded"),
                         (empty, "empty (zero-byte) file")):
        got = ask_photo(client, path)
        assert reason in got["message"] and got["annotated"] is None, got["message"]
    got = ask_video(client, text)
    assert "could not be opened as a video" in got["message"] and got["video"] is None
    assert "Happy" in ask_photo(client, astronaut_jpg)["message"]  # still serving


def test_huge_file_is_refused_with_the_limit_said_on_the_page(served, client, astronaut_jpg, tmp_path):
    huge = tmp_path / "huge.jpg"
    huge.write_bytes(b"\xff" * (MAX_MB * 2**20 + 1000))
    with pytest.raises(Exception, match="(?i)size|large"):
        ask_photo(client, huge)
    with urllib.request.urlopen(served.url + "config") as response:
        assert f"Files up to {MAX_MB} MB" in response.read().decode()
    assert "Happy" in ask_photo(client, astronaut_jpg)["message"]


def test_two_users_at_once_share_the_one_model(served, astronaut_jpg, monkeypatch, tmp_path):
    monkeypatch.setattr(app, "load_models", lambda *a, **k: pytest.fail("a request loaded a model"))
    answers, errors = [], []

    def user(c):
        try:
            answers.extend(table_rows(ask_photo(c, astronaut_jpg)["faces"]) for _ in range(2))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
    users = [threading.Thread(target=user, args=(make_client(served.url, tmp_path / f"user{k}"),))
             for k in range(2)]
    for thread in users:
        thread.start()
    for thread in users:
        thread.join(120)
    assert not errors and len(answers) == 4, (errors, answers)
    assert all(answer == answers[0] for answer in answers), answers


def get_status(url):
    try:
        with urllib.request.urlopen(url) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_the_page_serves_its_uploads_and_no_other_file(served, client, astronaut_jpg):
    annotated = ask_photo(client, astronaut_jpg)["annotated"]
    uploads = [os.path.join(folder, f) for folder, _, files in os.walk(served.root) for f in files
               if f == os.path.basename(annotated)]
    assert uploads, "uploads and results live under the page's own folder"
    file_url = served.url + "gradio_api/file="
    assert get_status(file_url + uploads[0]) == 200
    for private in ("/etc/passwd", os.path.abspath(app.__file__), predict.DEFAULT_CHECKPOINT,
                    os.path.join(served.root, "..", "..", "..", "etc", "passwd"),
                    astronaut_jpg):
        assert get_status(file_url + private) in (403, 404), private
    assert get_status(served.url + "file=/etc/passwd") in (403, 404)
    # Nor is a function handed a server path that was not uploaded (raw API: gradio_client would
    # upload the file from the caller's side).
    call = urllib.request.Request(served.url + "gradio_api/call/photo", method="POST",
                                  headers={"Content-Type": "application/json"}, data=json.dumps(
        {"data": [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, False]}).encode())
    with urllib.request.urlopen(call) as response:
        event = json.load(response)["event_id"]
    with urllib.request.urlopen(served.url + f"gradio_api/call/photo/{event}") as response:
        answer = response.read().decode()
    assert "event: error" in answer and "root:" not in answer, answer


def test_nothing_leaves_the_loopback(served, client, astronaut_jpg):
    ask_photo(client, astronaut_jpg)
    others = [a for a in served.connections
              if not (isinstance(a, tuple) and a[0] in ("127.0.0.1", "::1", "localhost"))
              and not isinstance(a, str)]  # str: a Unix socket
    assert not others, others


def test_old_requests_files_are_removed(served):
    old, new = served.page.new_folder(), served.page.new_folder()
    os.utime(old, (time.time() - app.KEEP_S - 60,) * 2)
    served.page.new_folder()
    assert not os.path.exists(old) and os.path.exists(new)


def test_an_onnx_model_serves_photos_and_says_grad_cam_needs_pth(astronaut_jpg, tmp_path):
    import importlib.util
    if not all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnxscript", "onnx")):
        pytest.skip("the optional onnx, onnxscript and onnxruntime packages are not installed")
    import checkpoint
    from tests.test_infer import random_model, save_checkpoint
    onnx = checkpoint.export(save_checkpoint(tmp_path / "a_best.pth", random_model(0)), tmp_path / "a.onnx")
    models = predict.load_models(onnx)
    page = app.Page(models, "cpu", str(tmp_path))
    os.makedirs(page.folder)
    assert not page.explainable
    annotated, faces, _, _, message = app.photo(page, astronaut_jpg, gradcam=True)
    (want,) = predict.detect_emotions(models, astronaut_jpg)
    assert faces.data["p_Happy"].tolist() == [want["emotions"]["Happy"]]
    assert "Grad-CAM needs .pth checkpoints" in message
    assert cv2.imread(annotated) is not None


# ----------------------------------------------------------------------------- camera, command line

def test_camera_frame_is_drawn_as_a_photo(served, models, astronaut_jpg):
    bgr = cv2.imread(astronaut_jpg)
    shown = app.camera(served.page, np.ascontiguousarray(bgr[:, :, ::-1]))
    found = predict.detect_emotions(models, bgr)
    want = faces.annotate(bgr.copy(), [(f["box"], f["emotion"], f["confidence"]) for f in found])
    np.testing.assert_array_equal(shown[:, :, ::-1], want)


def test_host_beyond_loopback_warns(monkeypatch, capsys, tmp_path):
    for key in ("GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE"):  # main sets them: put them back after
        monkeypatch.setenv(key, os.environ.get(key, ""))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    served = []
    monkeypatch.setattr(app, "serve", lambda *args, **kwargs: served.append(args))
    monkeypatch.setattr(app, "load_models", lambda paths, device: [])
    assert app.main(["--host", "0.0.0.0", "--port", "7999", "--device", "cpu"]) == 0
    assert "warning: --host 0.0.0.0" in capsys.readouterr().err
    assert served[0][2:4] == ("0.0.0.0", 7999)
    assert app.main(["--device", "cpu"]) == 0
    assert "warning" not in capsys.readouterr().err and served[1][2:4] == ("127.0.0.1", 7860)
    with pytest.raises(SystemExit):
        app.main(["--port", "0"])
    with pytest.raises(SystemExit):
        app.main(["-c", ""])
    assert "an empty path" in capsys.readouterr().err


def test_a_model_of_other_classes_is_refused_before_the_page_opens(monkeypatch, capsys, tmp_path):
    import checkpoint
    import utils
    from models import FerNet
    names = ["Happy", "Sad", "contempt"]  # a folder-trained model: its faces cannot be named by our seven
    path = tmp_path / "three.pth"
    torch.save({"format_version": checkpoint.FORMAT, "model_name": "vgg2_0_2", "class_names": names,
                "model_state": FerNet("vgg2_0_2", class_names=names).state_dict()}, path)
    monkeypatch.setattr(app, "serve", lambda *args, **kwargs: pytest.fail("the page was served"))
    with pytest.raises(SystemExit) as exit_:
        utils.run_cli(app.main, ["-c", str(path), "--device", "cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "the page's tabs (photo, video, camera) need a model of FER2013's seven classes" in err
    assert "Happy, Sad, contempt" in err and "Traceback" not in err


def test_command_line_serves_then_removes_its_folder(astronaut_jpg, tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path), MPLCONFIGDIR=str(tmp_path / "mpl"))
    process, url = app_browser.start_app(["--device", "cpu"], str(tmp_path / "app.log"), env=env)
    try:
        (folder,) = [f for f in os.listdir(tmp_path) if f.startswith("fer-app-")]
        c = make_client(url, tmp_path / "downloads")
        assert "Happy" in ask_photo(c, astronaut_jpg)["message"]
    finally:
        code = app_browser.stop_app(process)
    assert code == 0, (tmp_path / "app.log").read_text()
    assert not os.path.exists(tmp_path / folder)


# ----------------------------------------------------------------------------- a real browser

def test_browser_shows_the_annotated_photo_and_camera(served, astronaut_jpg, tmp_path):
    if app_browser.find_chromium() is None:
        pytest.skip("no Chromium to drive (apt-get install chromium); the page is tested through "
                    "gradio_client above")
    pytest.importorskip("playwright", reason="pip install playwright (requirements-dev.txt)")
    seen = app_browser.show_photo(served.url, astronaut_jpg, tmp_path / "profile",
                                  screenshot=tmp_path / "page.png")
    assert "1 face(s): face 0: Happy" in seen["message"] and "Happy" in seen["faces"]
    assert "astronaut" in seen["annotated"]
    assert cv2.imread(str(tmp_path / "page.png")) is not None
    y4m = app_browser.write_y4m(tmp_path / "camera.y4m",
                                read_all_clip(tmp_path / "camera.mp4"), fps=10)
    # Two more annotated frames after the first (timeout: an error from Playwright).
    _, _, camera_requests = app_browser.camera_frames(served.url, y4m, tmp_path / "profile2",
                                                      seconds=1, at_least=2)
    local = (served.url, "data:", "blob:")
    assert all(u.startswith(local) for u in seen["requests"] + camera_requests), \
        [u for u in seen["requests"] + camera_requests if not u.startswith(local)]


def read_all_clip(path):
    make_clip(path, 20, 1, (320, 240), 10.0, (0, 0))
    return read_all(path)

