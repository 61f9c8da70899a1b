"""Benchmark our training and evaluation against the usual FER2013 PyTorch pipeline, side by side.

    python3 bench.py                                   # all five models; the real CSV if present
    python3 bench.py --models vgg2_0_2 --steps 5       # one model, quickly
    python3 bench.py -d synthetic --skip_usual         # only our pipeline
    python3 bench.py --device cuda --amp               # on a GPU (bf16), with GPU utilisation
    python3 bench.py --amp --skip_usual                # ours in bf16 on a CPU that has it

What it measures, in one run:
  * the machine's ceiling: the best fp32 (with --amp also bf16) torch.mm GFLOP/s, measured at the
    start and again at the end (the better of the two counts: a shared machine can stall);
  * loading the data: ours (dataset.load_fer2013 from its uint8 cache, and cold, parsing the CSV)
    against the usual pandas read of the CSV once per split;
  * startup: seconds from launching `python run.py ...` (with --amp when the benchmark has it)
    until it logs "first training step done", and until its training loop started (median of 3
    launches);
  * per model: training img/s, evaluation img/s, achieved GFLOP/s and % of the ceiling, for
    - OUR pipeline, exactly what run.py runs: the cached uint8 arrays, train.Batches slices,
      train.augment on whole batches, channels-last, batch 128, run.py's default optimiser
      (SGD Nesterov) and label smoothing, driven by train.fit itself; evaluation by
      infer.predict at its default batch size; on a CPU, memory reuse (utils.reuse_freed_memory);
    - the USUAL pipeline (written here as the reference): a Dataset holding the pandas rows of a
      split that parses the pixel string and makes a PIL image per item, torchvision transforms per
      item, DataLoader(batch_size=16, shuffle=True, num_workers=4), Adadelta(lr=0.1), plain
      cross-entropy, NCHW; evaluation with batch size 1. It runs first, for every model, with the
      C library's default memory handling, before ours turns memory reuse on for the process.
Training img/s = images of the timed steps / their wall time (data slicing, augmentation and the
optimiser step included; warm-up steps excluded). Achieved GFLOP/s = img/s x forward GFLOP per
image (models.gflops_per_image) x 3 for training (forward + backward), x 1 for evaluation.

It prints progress, then a markdown table and the issue's goals (met or not), and writes
everything, with the machine's description, to --out (default outputs/bench.json; rewritten after
every model, so an interrupted run keeps what it measured). The full run takes about 7-9 minutes
on a quiet 2-core CPU; the usual pipeline is most of it (--skip_usual for ours only).
"""
import argparse
import gc
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import numpy as np
import torch
from torch.utils.data import Dataset

from utils import amp_dtype_for, eval_batch_size, reuse_freed_memory, save_json

ROOT = os.path.dirname(os.path.abspath(__file__))
# The usual pipeline's settings (the reference; see UsualFerDataset and measure_usual_*).
USUAL = {"batch_size": 16, "num_workers": 4, "optimizer": "Adadelta(lr=0.1)", "loss": "CrossEntropyLoss()",
         "memory_format": "NCHW", "eval_batch_size": 1, "eval_num_workers": 0,
         "train_transform": "RandomCrop(48, padding=4), RandomHorizontalFlip(), ToTensor()",
         "eval_transform": "ToTensor()", "csv_reads_per_start": 3}
STARTUP_MARKER = "first training step done"
STARTUP_MODEL = "vgg2_0_2"
# The goals.
CONV_HEAVY = ("vgg2_2_2", "vgg2_4_2_conv3", "vgg2_4_2_conv5")
CEILING_SHARE_GOAL = 0.75
TRAIN_RATIO_GOAL = {"vgg2_4_ilrb_2": 4.0}  # others: 2.0
EVAL_RATIO_GOAL = 3.0
STARTUP_GOAL_S = 2.0


def say(*args):
    print(*args, flush=True)


# ----------------------------------------------------------------------------- machine

def sync(device):
    """Wait for queued GPU work, so the clock sees it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def machine_info(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
            "device": str(device), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def busy_warning(info):
    """A warning when other processes already keep the CPUs busy (timings would be too low, and
    batch-1 inference with several threads collapses when its threads wait for each other)."""
    load = (info.get("load_average_at_start") or [0])[0]
    cores = info.get("cores_usable") or info.get("cores") or 1
    if load >= 0.5 * cores:
        return (f"the machine is busy (load average {load:.1f} on {cores} cores): the timings "
                "will be low and uneven; run the benchmark on a quiet machine")
    return None


def matmul_ceiling(device, dtype_name="float32", size=None, min_seconds=1.0):
    """Best GFLOP/s of a square torch.mm on `device` (repeated for min_seconds, best of)."""
    dtype = getattr(torch, dtype_name)
    size = size or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device, dtype)
    b = torch.randn(size, size, generator=gen).to(device, dtype)
    out = torch.mm(a, b)  # warm-up
    sync(device)
    best, repeats, start = math.inf, 0, time.perf_counter()
    while repeats < 5 or (time.perf_counter() - start < min_seconds and repeats < 200):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        best = min(best, time.perf_counter() - t)
        repeats += 1
    return {"gflop_s": 2 * size ** 3 / best / 1e9, "size": size, "dtype": dtype_name,
            "repeats": repeats, "best_seconds": best}


class UtilSampler:
    """Samples torch.cuda.utilization() (needs pynvml) every 50 ms in a thread; the mean over a
    time window is the GPU utilisation reported. Off the GPU, or without pynvml, it reports None
    and why."""

    def __init__(self, device):
        self.device, self.samples, self.error = device, [], None
        self._stop = threading.Event()
        self._thread = None
        if device.type != "cuda":
            self.error = "not on CUDA"

    def __enter__(self):
        if self.error is None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                value = torch.cuda.utilization(self.device)
            except Exception as err:  # pynvml absent, or no NVML on this driver
                self.error = f"{type(err).__name__}: {err}"[:200]
                return
            self.samples.append((time.perf_counter(), float(value)))
            self._stop.wait(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return False

    def mean(self, t0, t1):
        values = [v for t, v in self.samples if t0 <= t <= t1]
        return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------- our pipeline

class TimedBatches:
    """train.Batches cut to warmup + steps + 1 batches for train.fit, starting the clock when the
    loop asks for batch `warmup` and stopping it when it asks for batch `warmup + steps`, before
    that batch is sliced: the timed window is exactly `steps` whole steps (slicing, augmentation,
    forward, backward, optimiser, the loop's own bookkeeping). The extra last batch keeps fit's
    end-of-epoch validation out of the window. Runs into further epochs of `batches` if needed."""

    def __init__(self, batches, warmup, steps, device):
        self.batches, self.warmup, self.steps, self.device = batches, warmup, steps, device
        self.stamps, self.images = {}, 0

    def __len__(self):
        return self.warmup + self.steps + 1

    def _source(self):
        epoch = 0
        while True:
            yield from self.batches.epoch(epoch)
            epoch += 1

    def epoch(self, epoch, start=0):
        source = self._source()
        for i in range(start, len(self)):
            if i in (self.warmup, self.warmup + self.steps):
                sync(self.device)
                self.stamps[i] = time.perf_counter()
            _, images, labels = next(source)
            if self.warmup <= i < self.warmup + self.steps:
                self.images += len(labels)
            yield i, images, labels

    @property
    def window(self):
        return self.stamps[self.warmup], self.stamps[self.warmup + self.steps]


def run_defaults(model_name, device_name):
    """run.py's settings for a fresh run of `model_name` with every other flag at its default."""
    import run
    args, _, _ = run.resolve_run(run.get_args_parser(), ["-m", model_name, "--pretrained", "no",
                                                         "--device", device_name])
    return args


def autocast_dtype(device, amp):
    """run.py's choice of autocast dtype with --amp; None (fp32) without it."""
    return amp_dtype_for(device) if amp else None


def measure_ours_train(name, train_data, val_data, device, steps, warmup, amp=False, device_name="auto"):
    """Train `name` as run.py does, through train.fit; returns (model, measurement dict)."""
    import run
    import train
    from models import build_model
    args = run_defaults(name, device_name)
    torch.manual_seed(args.seed)
    model, _ = build_model(name, "no")
    model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = run.make_optimizer(model, args)
    amp_dtype = autocast_dtype(device, amp)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    batches = TimedBatches(train.Batches(*train_data, args.batch_size, args.seed), warmup, steps, device)
    cfg = argparse.Namespace(**dict(vars(args), epoch_num=1), amp_dtype=amp_dtype)
    state = {"step": 0, "stopper": train.EarlyStopper(args.patience, args.early_stop),
             "lr_factor": 1.0, "history": [], "elapsed": 0.0, "running": torch.zeros(3)}
    with UtilSampler(device) as sampler:
        ended = train.fit(model, optimizer, loss_fn, batches, val_data, cfg, state,
                          lambda kind: None, device, scaler, log=lambda *a, **k: None)
    if ended.startswith("stopped by"):
        raise KeyboardInterrupt
    t0, t1 = batches.window
    result = {"train_img_s": batches.images / (t1 - t0), "train_images": batches.images,
              "train_seconds": t1 - t0, "batch_size": args.batch_size, "optimizer": args.optimizer,
              "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
              "channels_last": args.channels_last}
    if device.type == "cuda":
        result["gpu_utilization_pct"] = sampler.mean(t0, t1)
        result["gpu_utilization_note"] = sampler.error
    return model, result


def measure_ours_eval(model, faces, device, amp=False):
    """infer.predict at its default batch size for the device (under inference_mode) over `faces`
    (uint8 N x 48 x 48, already on the GPU when training there), after one untimed warm-up batch."""
    import infer
    batch = eval_batch_size(None, device)
    amp_dtype = autocast_dtype(device, amp)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    with autocast:
        infer.predict(model, faces[:batch], device=device)
        sync(device)
        with UtilSampler(device) as sampler:
            t0 = time.perf_counter()
            infer.predict(model, faces, device=device)
            sync(device)
            t1 = time.perf_counter()
    result = {"eval_img_s": len(faces) / (t1 - t0), "eval_images": len(faces), "eval_seconds": t1 - t0,
              "eval_batch_size": batch}
    if device.type == "cuda":
        result["eval_gpu_utilization_pct"] = sampler.mean(t0, t1)
    return result


# ----------------------------------------------------------------------------- the usual pipeline

def usual_transforms(training):
    from torchvision import transforms
    if training:
        return transforms.Compose([transforms.RandomCrop(48, padding=4),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    return transforms.ToTensor()


class UsualFerDataset(Dataset):
    """The usual FER2013 Dataset (the reference, not our code path): reads the CSV with pandas
    (once per split), keeps that split's rows, and per item parses the pixel string, makes a PIL
    image and applies the torchvision `transform`. Items are (transform(image), label); the
    models take the grey (1, 48, 48) tensor in [0, 1] that ToTensor gives."""

    def __init__(self, csv_path, usage, transform=None):
        import pandas as pd
        table = pd.read_csv(csv_path)
        table.columns = [str(c).strip() for c in table.columns]
        self.data = table[table["Usage"].str.strip() == usage].reset_index(drop=True)
        self.transform = transform

    def __len__(self):
        return len(self.data)

    @staticmethod
    def face(pixels):
        """One pixel string -> uint8 (48, 48), as those repos parse it."""
        return np.array(pixels.split(), dtype=np.uint8).reshape(48, 48)

    def __getitem__(self, index):
        from PIL import Image
        row = self.data.iloc[index]
        image = Image.fromarray(self.face(row["pixels"]))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(row["emotion"])


def _forever(loader):
    while True:
        yield from loader


def measure_usual_train(name, train_set, device, steps, warmup):
    """Adadelta(lr=0.1), batch 16 from a 4-worker DataLoader, NCHW; returns (model, measurement).
    The first `warmup` steps (at least 1: the workers start there) are not timed."""
    from torch.utils.data import DataLoader
    from models import build_model
    warmup = max(1, warmup)
    torch.manual_seed(0)
    model, _ = build_model(name, "no")
    model.to(device).train()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=0.1)
    criterion = torch.nn.CrossEntropyLoss()
    images, train_loss, correct = 0, 0.0, 0
    with warnings.catch_warnings():  # "4 workers on 2 cores": deliberate, it is the reference
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        loader = DataLoader(train_set, batch_size=USUAL["batch_size"], shuffle=True,
                            num_workers=USUAL["num_workers"])
        batches = _forever(loader)
        try:
            for step in range(warmup + steps):
                if step == warmup:
                    sync(device)
                    t0 = time.perf_counter()
                inputs, targets = next(batches)
                inputs, targets = inputs.to(device), targets.to(device)
                optimizer.zero_grad()
                outputs = model(inputs)
                loss = criterion(outputs, targets)
                loss.backward()
                optimizer.step()
                train_loss += loss.item()
                correct += outputs.argmax(1).eq(targets).sum().item()
                if step >= warmup:
                    images += len(targets)
            sync(device)
            t1 = time.perf_counter()
        finally:
            batches.close()  # drops the loader's iterator: its worker processes end
    return model, {"train_img_s": images / (t1 - t0), "train_images": images, "train_seconds": t1 - t0,
                   "batch_size": USUAL["batch_size"], "optimizer": USUAL["optimizer"]}


def measure_usual_eval(model, val_set, device, n_images, warmup):
    """Batch size 1 under torch.no_grad, as those repos evaluate; `warmup` untimed images first."""
    from torch.utils.data import DataLoader
    loader = DataLoader(val_set, batch_size=USUAL["eval_batch_size"], shuffle=False,
                        num_workers=USUAL["eval_num_workers"])
    batches = _forever(loader)
    model.eval()
    correct, images = 0, 0
    try:
        with torch.no_grad():
            for i in range(warmup + n_images):
                if i == warmup:
                    sync(device)
                    t0 = time.perf_counter()
                inputs, targets = next(batches)
                inputs, targets = inputs.to(device), targets.to(device)
                outputs = model(inputs)
                _, predicted = torch.max(outputs, 1)
                correct += predicted.eq(targets).sum().item()
                if i >= warmup:
                    images += len(targets)
        sync(device)
        t1 = time.perf_counter()
    finally:
        batches.close()
    return {"eval_img_s": images / (t1 - t0), "eval_images": images, "eval_seconds": t1 - t0,
            "eval_batch_size": USUAL["eval_batch_size"]}


# ----------------------------------------------------------------------------- data and startup

def measure_data_load(path, skip_usual):
    """Seconds to get the data: ours cold (parse, no cache) and cached; the usual reads per split.

    Returns (timings dict, our FerData, {split: UsualFerDataset} or None)."""
    import dataset
    timings = {}
    t = time.perf_counter()
    dataset.load_fer2013(path, cache_dir=None)
    timings["ours_cold_s"] = time.perf_counter() - t
    dataset.load_fer2013(path)  # fills the cache when it is not there yet
    t = time.perf_counter()
    data = dataset.load_fer2013(path)
    timings["ours_cached_s"] = time.perf_counter() - t
    usual = None
    if not skip_usual:
        import pandas  # noqa: F401  (imported before the clock starts: we time the reads)
        usual, reads = {}, {}
        for split, usage in dataset.SPLITS.items():
            transform = usual_transforms(split == "train")
            t = time.perf_counter()
            usual[split] = UsualFerDataset(path, usage, transform)
            reads[split] = time.perf_counter() - t
        timings["usual_read_s"] = reads
        timings["usual_per_start_s"] = sum(reads.values())
    return timings, data, usual


def launch_until_first_step(cmd, timeout):
    """Launch run.py and kill it once it prints "first training step done N s after the loop
    started". Returns (seconds from the launch, N, None), or (None, None, why it never did)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    lines = []
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        try:
            for line in proc.stdout:
                found = re.search(STARTUP_MARKER + r" ([\d.]+) s", line)
                if found:
                    return time.perf_counter() - start, float(found.group(1)), None
                lines.append(line.rstrip())
        finally:
            watchdog.cancel()
            proc.kill()
            proc.wait()
            proc.stdout.close()
        err.seek(0)
        tail = (lines + err.read().strip().splitlines())[-5:]
    return None, None, (f"run.py never printed {STARTUP_MARKER!r} (exit code {proc.returncode}"
                        f"{', killed after %d s' % timeout if proc.returncode == -9 else ''}): "
                        + " | ".join(tail))


def measure_startup(csv_path, device_name="auto", threads=None, timeout=300, runs=3, amp=False):
    """Launch `python run.py -m vgg2_0_2 ...` (with --amp if asked, as our pipeline is measured)
    `runs` times (the data should be cached already):
    the median seconds until it has done its first training step, and until its training loop
    started (everything before the step: imports, data, model).

    Returns {"seconds", "loop_start_seconds": medians or None, "runs": [[total, loop start]...],
    "command": [...], "error": None or why}."""
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        cmd = [sys.executable, os.path.join(ROOT, "run.py"), "-m", STARTUP_MODEL, "-d", csv_path,
               "--epoch_num", "1", "--pretrained", "no", "--num_save", "0", "--run_name", "startup",
               "--checkpoint", os.path.join(tmp, "checkpoint"), "-o", os.path.join(tmp, "outputs"),
               "--device", device_name]
        if threads:
            cmd += ["--num_workers", str(threads)]
        if amp:
            cmd.append("--amp")
        done = []
        for _ in range(runs):
            seconds, step_seconds, error = launch_until_first_step(cmd, timeout)
            if error:
                return {"seconds": None, "loop_start_seconds": None, "runs": done, "command": cmd,
                        "error": error}
            done.append([seconds, seconds - step_seconds])
    return {"seconds": statistics.median(t for t, _ in done),
            "loop_start_seconds": statistics.median(s for _, s in done),
            "runs": done, "command": cmd, "error": None}


# ----------------------------------------------------------------------------- report

def _fmt(value, digits=1):
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def derive(result, ceiling_gflop_s):
    """Add GFLOP/s and % of the ceiling to one model's measurements, and the ratios."""
    g = result["gflop_per_image"]
    for side in ("ours", "usual"):
        r = result.get(side)
        if not r:
            continue
        if "train_img_s" in r:
            r["train_gflop_s"] = r["train_img_s"] * 3 * g
            r["train_pct_of_ceiling"] = 100 * r["train_gflop_s"] / ceiling_gflop_s
        if "eval_img_s" in r:
            r["eval_gflop_s"] = r["eval_img_s"] * g
            r["eval_pct_of_ceiling"] = 100 * r["eval_gflop_s"] / ceiling_gflop_s
    ours, usual = result.get("ours") or {}, result.get("usual") or {}
    for kind in ("train", "eval"):
        a, b = ours.get(f"{kind}_img_s"), usual.get(f"{kind}_img_s")
        result[f"{kind}_ratio"] = a / b if a and b else None
    return result


def goals(report):
    """The issue's goals: each with its value, target, direction and whether it is met."""
    out = []

    def goal(text, value, target, better="higher"):
        met = value >= target if better == "higher" else value < target
        out.append({"goal": text, "value": value, "target": target, "better": better, "met": met})

    for name, r in report["models"].items():
        ours = r.get("ours") or {}
        if name in CONV_HEAVY and "train_pct_of_ceiling" in ours:
            goal(f"{name} training at >= {CEILING_SHARE_GOAL:.0%} of the ceiling",
                 ours["train_pct_of_ceiling"] / 100, CEILING_SHARE_GOAL)
        if r.get("train_ratio") is not None:
            target = TRAIN_RATIO_GOAL.get(name, 2.0)
            goal(f"{name} training >= {target:g}x the usual pipeline", r["train_ratio"], target)
        if r.get("eval_ratio") is not None:
            goal(f"{name} evaluation >= {EVAL_RATIO_GOAL:g}x the usual pipeline", r["eval_ratio"],
                 EVAL_RATIO_GOAL)
    startup = (report.get("startup") or {}).get("seconds")
    if startup is not None:
        goal(f"first training step < {STARTUP_GOAL_S:g} s after the command (cached data)",
             startup, STARTUP_GOAL_S, "lower")
    return out


def table(report):
    rows = ["| model | GFLOP/img | ours train img/s | usual train img/s | ratio | ours GFLOP/s | "
            "% of ceiling | ours eval img/s | usual eval img/s | ratio |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["models"].items():
        ours, usual = r.get("ours") or {}, r.get("usual") or {}
        rows.append(" | ".join([
            f"| {name}", f"{r['gflop_per_image']:.3f}", _fmt(ours.get("train_img_s")),
            _fmt(usual.get("train_img_s")), _fmt(r.get("train_ratio"), 2) + "x" * bool(r.get("train_ratio")),
            _fmt(ours.get("train_gflop_s")), _fmt(ours.get("train_pct_of_ceiling")),
            _fmt(ours.get("eval_img_s")), _fmt(usual.get("eval_img_s")),
            _fmt(r.get("eval_ratio"), 2) + "x" * bool(r.get("eval_ratio"))]) + " |")
    return "\n".join(rows)


def data_line(d):
    line = f"data: ours {d['ours_cached_s']:.2f} s from the cache ({d['ours_cold_s']:.2f} s parsing the CSV)"
    if "usual_per_start_s" in d:
        line += (f"; usual {d['usual_per_start_s']:.2f} s per start (pandas read of the CSV once per "
                 f"split: " + ", ".join(f"{k} {v:.2f} s" for k, v in d["usual_read_s"].items()) + ")")
    return line


def summary_lines(report):
    c = report["ceiling"]
    lines = [f"ceiling: {c['gflop_s']:.0f} GFLOP/s ({c['dtype']} {c['size']}x{c['size']} torch.mm on "
             f"{report['machine']['device']}, {report['machine']['torch_threads']} threads)"]
    if c["dtype"] != "float32":
        lines.append(f"fp32 matmul: {report['ceiling_fp32']['gflop_s']:.0f} GFLOP/s")
    lines.append(data_line(report["data_load"]))
    s = report.get("startup")
    if s:
        flags = " --amp" if "--amp" in s["command"] else ""
        lines.append(f"startup: {_fmt(s['seconds'], 2)} s from `python run.py -m {STARTUP_MODEL}{flags}` to the "
                     f"end of the first training step, {_fmt(s['loop_start_seconds'], 2)} s to the "
                     "start of the training loop (medians)" + (f" ({s['error']})" if s["error"] else ""))
    for name, r in report["models"].items():
        util = (r.get("ours") or {}).get("gpu_utilization_pct", "absent")
        if util != "absent":
            lines.append(f"{name}: GPU utilisation during our training "
                         f"{_fmt(util, 0)}%" + (f" ({r['ours'].get('gpu_utilization_note')})"
                                                if util is None else ""))
    return lines


# ----------------------------------------------------------------------------- main

def get_args_parser():
    import dataset
    from models import MODEL_NAMES
    p = argparse.ArgumentParser(description="Benchmark our pipeline against the usual FER2013 one.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-d", "--dataset",
                   default=dataset.DEFAULT_CSV if os.path.exists(dataset.DEFAULT_CSV) else "synthetic",
                   help="a FER2013 CSV, or 'synthetic'")
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES),
                   help="models to measure")
    p.add_argument("--steps", type=int, default=20,
                   help="timed training steps of our pipeline (batch 128) per model")
    p.add_argument("--usual_steps", type=int, default=None,
                   help="timed steps of the usual pipeline (batch 16); default 2 x --steps")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed warm-up steps of ours; the usual pipeline gets 4x as many "
                        "(steps and evaluation images)")
    p.add_argument("--eval_images", type=int, default=1024,
                   help="validation faces timed per evaluation (capped at the split's size)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    p.add_argument("--amp", action="store_true",
                   help="bf16 autocast for our pipeline (CUDA, or CPUs with bf16 support)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--matmul_size", type=int, default=None,
                   help="side of the matmul for the ceiling (default 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--skip_usual", action="store_true", help="measure only our pipeline")
    p.add_argument("--skip_startup", action="store_true", help="skip the run.py startup measurement")
    p.add_argument("--out", default="outputs/bench.json", help="JSON file to write")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def main(argv):
    from utils import UserError, check_writable

    args = get_args_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.eval_images < 1 or args.threads < 0:
        raise UserError("--steps, --warmup and --eval_images must be at least 1, --threads 0 or more")
    usual_steps = args.usual_steps or 2 * args.steps
    check_writable(os.path.dirname(os.path.abspath(args.out)))
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return _bench(args, usual_steps)
    finally:
        torch.set_num_threads(threads)


def checkpoint_report(report, started, path):
    """Save what was measured so far: an interrupted run keeps it."""
    gc.collect()
    report["seconds"] = time.perf_counter() - started
    save_json(report, path)


def _bench(args, usual_steps):
    import dataset
    from models import FerNet, gflops_per_image
    from utils import select_device

    device = select_device(args.device)
    started = time.perf_counter()

    report = {"machine": machine_info(device),
              "settings": dict(vars(args), usual_steps=usual_steps, usual_warmup=4 * args.warmup),
              "usual_pipeline": USUAL,
              "our_pipeline": {"train": "run.py defaults through train.fit",
                               "eval": "infer.predict at its default batch size"},
              "models": {}}
    say(f"bench on {device} ({report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"{torch.get_num_threads()} torch threads), torch {torch.__version__}")
    busy = busy_warning(report["machine"])
    if busy:
        report["machine"]["warning"] = busy
        say(f"warning: {busy}")

    say("matmul ceiling ...")
    report["ceiling_fp32"] = matmul_ceiling(device, "float32", args.matmul_size)
    amp_dtype = autocast_dtype(device, args.amp)
    ceiling_dtype = str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "float32"
    if args.amp and amp_dtype is None:
        say(f"note: --amp needs CUDA or a CPU with bf16; measuring fp32 on {device.type}")
    report["ceiling"] = report["ceiling_at_start"] = (
        report["ceiling_fp32"] if ceiling_dtype == "float32"
        else matmul_ceiling(device, ceiling_dtype, args.matmul_size))
    ceiling = report["ceiling"]["gflop_s"]
    say(f"  {ceiling:.0f} GFLOP/s ({ceiling_dtype})")

    path = os.path.abspath(dataset.resolve_path(args.dataset))
    report["dataset"] = path
    say(f"loading {path} (ours: cold and cached; usual: pandas once per split) ...")
    report["data_load"], data, usual_sets = measure_data_load(path, args.skip_usual)
    say("  " + data_line(report["data_load"]))

    if not args.skip_startup:
        say(f"startup: launching run.py -m {STARTUP_MODEL} until its first training step ...")
        report["startup"] = measure_startup(path, args.device, args.threads, amp=args.amp)
        say(f"  {_fmt(report['startup']['seconds'], 2)} s (loop started after "
            f"{_fmt(report['startup']['loop_start_seconds'], 2)} s)" +
            (f" ({report['startup']['error']})" if report["startup"]["error"] else ""))

    # Our data as run.py holds it: uint8 tensors, moved to the GPU once when training there.
    to_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    train_x, train_y = data.split("train")
    val_x, val_y = data.split("val")
    train_data = (to_tensor(train_x).unsqueeze(1), to_tensor(train_y))
    val_faces = to_tensor(val_x)
    fit_val = (val_faces[:2].unsqueeze(1), to_tensor(val_y[:2]))  # fit's final validation: untimed
    if device.type == "cuda":
        train_data = tuple(t.to(device) for t in train_data)
        val_faces = val_faces.to(device)
        fit_val = tuple(t.to(device) for t in fit_val)
    n_eval = min(args.eval_images, len(val_y))
    eval_faces = val_faces[:n_eval]

    for name in args.models:
        g = gflops_per_image(FerNet(name))
        report["models"][name] = {"gflop_per_image": g}
    # The usual pipeline runs first, with the C library's default memory handling; ours then turns
    # on memory reuse as run.py does, a process-wide setting that cannot be taken back.
    if usual_sets is not None:
        for name, result in report["models"].items():
            say(f"{name} ({result['gflop_per_image']:.3f} GFLOP per image forward)")
            model, result["usual"] = measure_usual_train(name, usual_sets["train"], device,
                                                         usual_steps, 4 * args.warmup)
            say(f"  usual train {result['usual']['train_img_s']:8.1f} img/s")
            result["usual"].update(measure_usual_eval(model, usual_sets["val"], device, n_eval,
                                                      4 * args.warmup))
            say(f"  usual eval  {result['usual']['eval_img_s']:8.1f} img/s")
            del model
            checkpoint_report(report, started, args.out)
    report["our_pipeline"]["reuse_freed_memory"] = reuse_freed_memory(device)
    for name, result in report["models"].items():
        say(f"{name} ({result['gflop_per_image']:.3f} GFLOP per image forward)")
        model, result["ours"] = measure_ours_train(name, train_data, fit_val, device, args.steps,
                                                   args.warmup, args.amp, args.device)
        say(f"  ours  train {result['ours']['train_img_s']:8.1f} img/s")
        result["ours"].update(measure_ours_eval(model, eval_faces, device, args.amp))
        say(f"  ours  eval  {result['ours']['eval_img_s']:8.1f} img/s")
        del model
        derive(result, ceiling)
        checkpoint_report(report, started, args.out)

    # A shared machine can run slow for a few seconds: measured again at the end, the better of
    # the two is the ceiling, and every model's share of it is worked out again.
    say("matmul ceiling again ...")
    report["ceiling_at_end"] = matmul_ceiling(device, ceiling_dtype, args.matmul_size)
    say(f"  {report['ceiling_at_end']['gflop_s']:.0f} GFLOP/s ({ceiling_dtype})")
    report["ceiling"] = max(report["ceiling_at_start"], report["ceiling_at_end"], key=lambda c: c["gflop_s"])
    for result in report["models"].values():
        derive(result, report["ceiling"]["gflop_s"])
    report["goals"] = goals(report)
    report["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report["seconds"] = time.perf_counter() - started
    save_json(report, args.out)
    say("")
    say(table(report))
    say("")
    for line in summary_lines(report):
        say(line)
    if report["goals"]:
        say("goals:")
        for g in report["goals"]:
            say(f"  [{'met' if g['met'] else 'NOT met'}] {g['goal']}: {g['value']:.2f}")
    say(f"{report['seconds']:.0f} s in all; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    from utils import run_cli
    sys.exit(run_cli(main))
