"""Speed of the web page (app.py) through its API on loopback: a 640x480 photo with one face, and
camera frames per second. A developer benchmark, not a test.

    python3 tools/bench_app.py                           # the shipped model; results/bench_app.json
    python3 tools/bench_app.py --photos 50 --json /tmp/quiet.json --note "nothing else running"

app.py runs in its own process, started as a user starts it (`python3 app.py --port <free>`).
The photo is a 640x480 frame of tools/bench_video.make_clip (the astronaut's head on a plain
gradient, saved as JPEG). Each photo goes the way the page's JavaScript (and curl) sends it,
through Gradio's HTTP API on one kept-alive connection: upload the file, call /photo, read the
answer, download the annotated picture; the time runs from the upload to the picture's last byte.
The same with the Grad-CAM switch on, and through gradio_client.Client.predict (which adds its own
overhead per call). The three take turns, after --warmup untimed rounds; medians and 90th
percentiles.

Camera: Chromium (tools/app_browser.py; skipped when there is none) plays a 640x480 clip of that
face as its webcam on the Camera tab; frames/s counts the annotated frames that reach the page
(the page sends a frame at most every app.CAMERA_EVERY_S). For comparison, app.camera alone on
the same frames in this process (no browser, no HTTP).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tools import app_browser  # noqa: E402
from tools.bench_video import make_clip, read_all  # noqa: E402
from tools.common import machine_info  # noqa: E402
from utils import save_json  # noqa: E402


def api_photo(http, url, photo, gradcam=False):
    """One photo through the HTTP API as the page sends it; returns (seconds, message)."""
    start = time.perf_counter()
    with open(photo, "rb") as f:
        (path,) = http.post(f"{url}gradio_api/upload", files={"files": f}).raise_for_status().json()
    event = http.post(f"{url}gradio_api/call/photo", json={"data": [
        {"path": path, "meta": {"_type": "gradio.FileData"}}, gradcam]}).raise_for_status().json()
    answer = http.get(f"{url}gradio_api/call/photo/{event['event_id']}").raise_for_status().text
    lines = answer.splitlines()  # server-sent events: "event: complete", then "data: [outputs]"
    if "event: complete" not in lines:
        raise RuntimeError(f"/photo failed: {answer[:500]}")
    outputs = json.loads(lines[lines.index("event: complete") + 1].removeprefix("data: "))
    http.get(outputs[0]["url"]).raise_for_status()  # the annotated picture, as the page shows it
    return time.perf_counter() - start, outputs[4]


def timed(calls, n, warmup):
    """{name: {n, median_s, p90_s, seconds}} of `calls` ({name: function}), called in turn, n
    rounds after `warmup` untimed ones: a machine that gets busier for a while slows all alike."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    seconds = {name: [] for name in calls}
    for _ in range(n):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
    return {name: {"n": n, "median_s": statistics.median(s), "p90_s": sorted(s)[max(0, round(0.9 * n) - 1)],
                   "seconds": s} for name, s in seconds.items()}


def bench_photos(url, photo, n, warmup):
    import httpx
    from gradio_client import Client, handle_file
    with httpx.Client(timeout=120) as http, tempfile.TemporaryDirectory() as downloads:
        print(api_photo(http, url, photo)[1])
        client = Client(url, download_files=downloads, verbose=False, analytics_enabled=False)
        tempfile.tempdir = downloads  # gradio_client leaves an empty folder there per download
        return timed({"photo_api": lambda: api_photo(http, url, photo),
                      "photo_api_gradcam": lambda: api_photo(http, url, photo, True),
                      "photo_gradio_client": lambda: client.predict(handle_file(photo), False,
                                                                    api_name="/photo")}, n, warmup)


def bench_camera(url, frames, folder, seconds, checkpoints):
    """Frames/s of the Camera tab in Chromium, and of app.camera alone in this process."""
    import torch

    import app
    import infer
    out = {}
    if app_browser.find_chromium():
        y4m = app_browser.write_y4m(os.path.join(folder, "camera.y4m"), frames, fps=30)
        count, rate, _ = app_browser.camera_frames(url, y4m, os.path.join(folder, "profile"), seconds)
        out["camera_browser"] = {"frames": count, "seconds": seconds, "frames_per_s": rate}
    else:
        print("no Chromium: the camera in the browser is not measured")
    torch.set_num_threads(1)  # as app.py on a CPU
    page = app.Page(infer.load_models(checkpoints or infer.DEFAULT_CHECKPOINT), "cpu", folder)
    rgb = [f[:, :, ::-1].copy() for f in frames]
    app.camera(page, rgb[0])
    start = time.perf_counter()
    for frame in rgb:
        app.camera(page, frame)
    out["camera_function"] = {"frames": len(rgb), "frames_per_s": len(rgb) / (time.perf_counter() - start)}
    return out


def table(result):
    m = result["machine"]
    lines = [f"{result['checkpoints']}, {m['cpu']} ({m['cores']} cores), load at start "
             f"{m['load_average_at_start']}, at end {result['load_average_at_end']}"
             + (f"; {result['note']}" if result["note"] else ""),
             "", "| what | median | 90th percentile | calls |", "|---|---|---|---|"]
    for key, what in (("photo_api", "640x480 photo, 1 face: HTTP API (upload, /photo, picture)"),
                      ("photo_api_gradcam", "the same with Grad-CAM"),
                      ("photo_gradio_client", "the same through gradio_client.predict")):
        r = result[key]
        lines.append(f"| {what} | {r['median_s']:.3f} s | {r['p90_s']:.3f} s | {r['n']} |")
    for key, what in (("camera_browser", "Camera tab in Chromium (640x480 frames)"),
                      ("camera_function", "app.camera alone, in process")):
        if key in result:
            lines.append(f"| {what} | {result[key]['frames_per_s']:.1f} frames/s | | "
                         f"{result[key]['frames']} frames |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--checkpoint", "-c", nargs="+", default=None,
                   help="passed to app.py (default: its shipped model)")
    p.add_argument("--photos", type=int, default=30,
                   help="timed rounds of the three photo calls (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default: %(default)s)")
    p.add_argument("--camera_s", "--camera-s", type=float, default=15.0,
                   help="seconds of camera in the browser (default: %(default)s)")
    p.add_argument("--json", default=os.path.join(ROOT, "results", "bench_app.json"),
                   help="the result with the machine's description (default: results/bench_app.json)")
    p.add_argument("--note", default="", help="a remark stored with the result (e.g. what else ran)")
    args = p.parse_args(argv)
    result = {"machine": machine_info(), "checkpoints": args.checkpoint or ["(app.py's default)"],
              "note": args.note}
    with tempfile.TemporaryDirectory(prefix="bench-app-") as tmp:
        clip = os.path.join(tmp, "clip.mp4")
        make_clip(clip, 90, 1, (640, 480), 30.0, (0, 0))
        frames = read_all(clip)
        photo = os.path.join(tmp, "photo.jpg")
        import cv2
        cv2.imwrite(photo, frames[len(frames) // 2])
        process, url = app_browser.start_app(["-c", *args.checkpoint] if args.checkpoint else [],
                                             os.path.join(tmp, "app.log"))
        try:
            result.update(bench_photos(url, photo, args.photos, args.warmup))
            result.update(bench_camera(url, frames, tmp, args.camera_s, args.checkpoint))
        finally:
            app_browser.stop_app(process)
    result["load_average_at_end"] = os.getloadavg()
    save_json(result, args.json)
    print(f"{table(result)}\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
