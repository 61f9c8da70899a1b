"""Drive the web page (app.py) in headless Chromium: the browser test's helper, the README's
screenshot and the camera rate of tools/bench_app.py.

    python3 tools/app_browser.py                     # results/app_photo.png, the shipped model
    python3 tools/app_browser.py -c pretrained/fer2013_vgg2_4_2_conv3.pth --out /tmp/page.png

It starts `app.py` on a free loopback port, opens the page in Debian's Chromium (`apt-get install
chromium`) through Playwright (`pip install playwright`; Playwright's own browser download is not
used), drops the astronaut photo (skimage.data.astronaut) on the Photo tab, waits for the
annotated picture and saves a screenshot of the whole page. The browser runs with a fresh profile
and the flags below, so it makes no connection of its own (updates, sync, field trials); every
request the page makes is recorded, to show that it loads nothing from elsewhere.
"""
import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# A camera for the Camera tab: Chromium plays a .y4m file as the webcam, no permission prompt.
CAMERA_FLAGS = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]


def find_chromium():
    """The Chromium (or Chrome) executable: $CHROMIUM, else the first on PATH; None if none."""
    named = os.environ.get("CHROMIUM")
    if named:
        return named if os.path.exists(named) else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def open_browser(playwright, profile, camera=None, chromium=None):
    """A headless Chromium context with a fresh profile folder; `camera`: a .y4m file that plays
    as the webcam."""
    flags = CHROMIUM_FLAGS + (CAMERA_FLAGS + [f"--use-file-for-fake-video-capture={camera}"]
                              if camera else [])
    profile = os.path.abspath(profile)
    # Its home too: Chromium writes crash-report settings and GTK's dconf under $HOME otherwise.
    home = {"HOME": profile, "XDG_CONFIG_HOME": os.path.join(profile, "config"),
            "XDG_CACHE_HOME": os.path.join(profile, "cache")}
    return playwright.chromium.launch_persistent_context(
        profile, executable_path=chromium or find_chromium(), headless=True, args=flags,
        env={**os.environ, **home}, viewport={"width": 1280, "height": 900})


def show_photo(url, photo, profile, screenshot=None, gradcam=False, timeout_s=60):
    """Open the page, drop `photo` on the Photo tab and wait until its annotated copy and the
    message under it are shown. Returns {"message", "faces" (the table's text), "requests"
    (every URL the page asked for)}; saves a full-page screenshot when asked."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        context = open_browser(playwright, profile)
        try:
            page = context.new_page()
            requests = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(url, wait_until="load", timeout=timeout_s * 1000)
            page.locator("#photo input[type=file]").set_input_files(os.fspath(photo))
            message = page.locator("#photo_message")
            message.get_by_text(os.path.basename(photo)).wait_for(timeout=timeout_s * 1000)
            page.locator("#annotated img").wait_for(timeout=timeout_s * 1000)
            if gradcam:  # a second answer: the picture with the maps replaces the first
                before = page.locator("#annotated img").get_attribute("src")
                page.get_by_label("Grad-CAM", exact=False).check()
                page.wait_for_function("old => document.querySelector('#annotated img').src !== old",
                                       arg=before, timeout=timeout_s * 1000)
            result = {"message": message.inner_text(), "faces": page.locator("#faces").inner_text(),
                      "annotated": page.locator("#annotated img").get_attribute("src"),
                      "requests": requests}
            if screenshot:
                page.wait_for_timeout(300)  # the chart and table settle
                page.screenshot(path=os.fspath(screenshot), full_page=True)
            return result
        finally:
            context.close()


def camera_frames(url, y4m, profile, seconds=10.0, at_least=0, timeout_s=60):
    """Turn on the Camera tab with `y4m` as the webcam and count the annotated frames that come
    back in `seconds` (after the first), then wait up to timeout_s for `at_least` in all (a test
    on a busy machine). Returns (frames, frames per second, request URLs)."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        context = open_browser(playwright, profile, camera=y4m)
        try:
            page = context.new_page()
            requests = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(url, wait_until="load", timeout=timeout_s * 1000)
            page.get_by_role("tab", name="Camera").click()
            page.get_by_text("Click to Access Webcam").click()
            page.locator("#camera button[aria-label='capture photo']").click()
            shown = page.locator("#camera_out img")
            shown.wait_for(timeout=timeout_s * 1000)
            # Count in the page: each new frame replaces the picture's src.
            page.evaluate("""() => {
                window.__frames = 0;
                new MutationObserver(() => window.__frames++).observe(
                    document.querySelector('#camera_out img'), {attributes: true, attributeFilter: ['src']});
            }""")
            start = time.perf_counter()
            page.wait_for_timeout(seconds * 1000)
            frames = page.evaluate("() => window.__frames")
            rate = frames / (time.perf_counter() - start)
            page.wait_for_function("n => window.__frames >= n", arg=at_least, timeout=timeout_s * 1000)
            return frames, rate, requests
        finally:
            context.close()


def write_y4m(path, frames, fps=30):
    """BGR frames as an uncompressed YUV4MPEG2 (4:2:0) file, the format Chromium's fake camera
    plays."""
    import cv2
    height, width = frames[0].shape[:2]
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F{int(fps)}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            f.write(b"FRAME\n" + cv2.cvtColor(frame, cv2.COLOR_BGR2YUV_I420).tobytes())
    return path


# ----------------------------------------------------------------------------- the app as a process

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(args, log, env=None, timeout_s=120):
    """`python3 app.py ARGS --port <free>` in a child process, its output into the file `log`;
    returns (process, URL) once the page answers."""
    port = free_port()
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), *args,
                                    "--port", str(port)], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(log) as f:
                raise RuntimeError(f"app.py exited with code {process.returncode}:\n{f.read()}")
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return process, url
        except OSError:
            time.sleep(0.5)
    stop_app(process)
    raise RuntimeError(f"app.py did not answer on {url} within {timeout_s} s")


def stop_app(process, timeout_s=30):
    """Ctrl-C (the app removes its temporary folder), then kill if it hangs; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def astronaut_jpg(folder):
    import cv2
    import skimage.data
    path = os.path.join(folder, "astronaut.jpg")
    cv2.imwrite(path, skimage.data.astronaut()[:, :, ::-1])
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", "-c", nargs="+", default=None,
                   help="passed to app.py (default: its shipped model)")
    p.add_argument("--photo", default=None, help="the photo to drop (default: the astronaut)")
    p.add_argument("--gradcam", action="store_true", help="turn the Grad-CAM switch on")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "app_photo.png"),
                   help="the screenshot (default: results/app_photo.png)")
    args = p.parse_args(argv)
    if find_chromium() is None:
        sys.exit("no Chromium found: apt-get install chromium (or set CHROMIUM=/path/to/chrome)")
    with tempfile.TemporaryDirectory(prefix="app-browser-") as tmp:
        photo = args.photo or astronaut_jpg(tmp)
        process, url = start_app(["-c", *args.checkpoint] if args.checkpoint else [],
                                 os.path.join(tmp, "app.log"))
        try:
            seen = show_photo(url, photo, os.path.join(tmp, "profile"), args.out, args.gradcam)
        finally:
            stop_app(process)
    others = [u for u in seen["requests"] if not u.startswith((url, "data:", "blob:"))]
    print(f"{seen['message']}\n{len(seen['requests'])} requests, {len(others)} to other places"
          + "".join(f"\n  {u}" for u in others) + f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
