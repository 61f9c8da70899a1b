"""Developer benchmark (not part of the product): training and evaluation speed of our pipeline,
which is exactly what run.py runs, against the usual FER2013 PyTorch pipeline; and what the two
CPU speed hacks, utils.reuse_freed_memory and models.PReLU's backward, are worth.

Run it from the repository root:

    python3 tools/bench.py -d ../shared/data/fer2013.csv.gz --amp          # five models, ours vs usual
    python3 tools/bench.py -d synthetic --models vgg2_0_2 --steps 5 --skip_usual   # a quick look
    python3 tools/bench.py -d ../shared/data/fer2013.csv.gz --amp --skip_usual \\
        --models vgg2_4_ilrb_2 vgg2_4_2_conv3 --compare_reuse --compare_prelu --repeats 3 \\
        --out results/bench_hacks_cpu.json                                  # the two hacks

Variants measured per model (the first always, the others on request):
  ours         run.py with every flag at its default (plus --amp when given): run.resolve_run for
               the settings, utils.reuse_freed_memory as run.main calls it, run.training_parts
               (model placement, run.make_optimizer, the loss, the weight average, the autocast
               dtype), dataset.Batches, train.train_steps; evaluation by train.evaluate at run.py's
               evaluation batch size, under the same autocast as run.py's validation.
  no_reuse     (--compare_reuse) ours without utils.reuse_freed_memory.
  torch_prelu  (--compare_prelu) ours with every models.PReLU swapped for a torch.nn.PReLU with the
               same slope (torch's own CPU backward).
  distil       (--teacher FILE ...) ours distilling from those teachers, as run.py --teacher: their
               forward passes on every augmented batch are part of the step.
  usual        (unless --skip_usual) the common FER2013 pipeline, written here as the reference: a
               Dataset of one split's pandas rows that parses the pixel string and makes a PIL image
               per item, torchvision transforms, DataLoader(batch_size=16, shuffle=True,
               num_workers=4), Adadelta(lr=0.1), plain cross-entropy, fp32, NCHW; evaluation with
               batch size 1.

Every measurement runs in a fresh child process (`tools/bench.py --child SPEC`): the memory
setting is process-wide and cannot be undone, and each variant starts from the same state. Within
a repeat the variants run back to back, their order rotated from one repeat to the next, so a
machine that is busier for a while slows them all alike; the table shows medians over --repeats.
Training img/s = images of the timed steps / their wall time (slicing, augmentation, forward,
backward, optimiser step and weight-average update included; --warmup steps before are not timed).
Evaluation img/s = --eval_images validation faces / the wall time of one pass (after one untimed
batch). Train GFLOP/s = img/s x 3 x forward GFLOP per image (models.gflops_per_image).

The table is printed and everything, with the machine's description and load, is written to --out
(rewritten after every measurement, so an interrupted run keeps what it measured).

Sections: --section train (this file, the default). The other sections live in their own scripts,
tools/bench_video.py and tools/bench_onnx.py; --section video / onnx hands the rest of the command
line to them.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.common import machine_info  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from utils import DEFAULT_CSV, UserError, run_cli, save_json  # noqa: E402

TOOLS = os.path.dirname(os.path.abspath(__file__))
# --section: None = this file; the others are the scripts beside it that measure them.
SECTIONS = {"train": None, "video": "bench_video.py", "onnx": "bench_onnx.py"}
VARIANTS = ("ours", "no_reuse", "torch_prelu", "distil", "usual")
USUAL = {"batch_size": 16, "num_workers": 4, "optimizer": "Adadelta(lr=0.1)",
         "loss": "CrossEntropyLoss()", "memory_format": "NCHW", "eval_batch_size": 1,
         "train_transform": "RandomCrop(48, padding=4), RandomHorizontalFlip(), ToTensor()",
         "eval_transform": "ToTensor()"}
RESULT = "BENCH-RESULT "  # the child's last line: this prefix, then its measurement as JSON


def say(*args):
    print(*args, flush=True)


def sync(device):
    """Wait for queued GPU work, so that the clock sees it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ----------------------------------------------------------------------------- our pipeline

def use_torch_prelu(model):
    """Swap every models.PReLU in `model` for a torch.nn.PReLU with the same slope; returns the
    number swapped."""
    import models
    found = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if isinstance(child, models.PReLU)]
    for parent, name, child in found:
        plain = torch.nn.PReLU(child.num_parameters).to(child.weight.device)
        with torch.no_grad():
            plain.weight.copy_(child.weight)
        setattr(parent, name, plain)
    return len(found)


def prelu_count(model):
    """{class name: count} of the PReLU modules in `model`."""
    counts = {}
    for module in model.modules():
        if isinstance(module, torch.nn.PReLU):
            key = f"{type(module).__module__}.{type(module).__name__}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def measure_ours(spec):
    """Train and evaluate spec["model"] as run.py does; the "no_reuse" and "torch_prelu" variants
    each leave out one speed hack; "distil" adds spec["teacher"] (run.py --teacher)."""
    import checkpoint
    import dataset
    import predict
    import run
    import train
    from models import build_model
    from utils import eval_batch_size, reuse_freed_memory, seed_everything, select_device
    argv = ["-m", spec["model"], "--pretrained", "no", "--device", spec["device"],
            "--threads", str(spec["threads"])] + ["--amp" if spec["amp"] else "--no-amp"]
    if spec["variant"] == "distil":
        argv += ["--teacher", *spec["teacher"]]
    args, _, _ = run.resolve_run(run.get_args_parser(), argv)
    device = select_device(args.device)
    reuse = reuse_freed_memory(device) if spec["variant"] != "no_reuse" else False
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = dataset.load_fer2013(spec["dataset"], log=lambda *a: None)
    load_s = time.perf_counter() - started
    train_x, train_y = data.split("train")
    val_x, val_y = data.split("val")
    seed_everything(args.seed)
    model, _ = build_model(args.model, "no")
    if spec["variant"] == "torch_prelu":
        use_torch_prelu(model)
    parts = run.training_parts(model, args, train_y, device, run.load_teachers(args, device))
    model, amp_dtype = parts.model, parts.amp_dtype
    batches = dataset.Batches(train_x, train_y, args.batch_size, device, args.seed)
    state = checkpoint.TrainState()
    warmup, steps = spec["warmup"], spec["steps"]
    with train.StopRequest() as stop:
        train.train_steps(parts, batches, state, args, warmup, stop, show_progress=False)
        sync(device)
        t0 = time.perf_counter()
        loss, acc, images, stopped = train.train_steps(parts, batches, state, args, warmup + steps, stop,
                                                       show_progress=False)
        sync(device)
        t1 = time.perf_counter()
    if stopped or stop.requested:
        raise KeyboardInterrupt
    n = min(spec["eval_images"], len(val_y))
    eval_batch = eval_batch_size(args.eval_batch_size, device)
    with predict.autocast(device, amp_dtype):  # as run.py validates
        train.evaluate(model, dataset.Batches(val_x[:eval_batch], val_y[:eval_batch], eval_batch,
                                              device, shuffle=False))  # warm-up
        val = dataset.Batches(val_x[:n], val_y[:n], eval_batch, device, shuffle=False)
        sync(device)
        e0 = time.perf_counter()
        val_loss, val_acc = train.evaluate(model, val)
        sync(device)
        e1 = time.perf_counter()
    return {"train_img_s": images / (t1 - t0), "train_images": images, "train_seconds": t1 - t0,
            "train_loss": loss, "eval_img_s": n / (e1 - e0), "eval_images": n, "eval_seconds": e1 - e0,
            "eval_loss": val_loss, "data_load_s": load_s, "batch_size": args.batch_size,
            "eval_batch_size": eval_batch, "optimizer": type(parts.optimizer).__name__,
            "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else None,
            "channels_last": args.channels_last, "ema_decay": args.ema_decay,
            "reuse_freed_memory": reuse, "prelu_modules": prelu_count(model)}


# ----------------------------------------------------------------------------- the usual pipeline

def usual_transforms(training):
    from torchvision import transforms
    if training:
        return transforms.Compose([transforms.RandomCrop(48, padding=4),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    return transforms.ToTensor()


class UsualFerDataset(torch.utils.data.Dataset):
    """The usual FER2013 Dataset (the reference, not our code path): the pandas rows of one split;
    per item it parses the pixel string, makes a PIL image and applies `transform`."""

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
        return np.array(pixels.split(), dtype=np.uint8).reshape(48, 48)

    def __getitem__(self, index):
        from PIL import Image
        row = self.data.iloc[index]
        image = Image.fromarray(self.face(row["pixels"]))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(row["emotion"])


def forever(loader):
    while True:
        yield from loader


def measure_usual(spec):
    """The usual pipeline: 2 x --steps timed steps of batch 16 after 4 x --warmup untimed ones
    (the workers start there), then --eval_images faces one at a time."""
    from torch.utils.data import DataLoader
    from models import build_model
    from utils import select_device
    device = select_device(spec["device"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    started = time.perf_counter()
    train_set = UsualFerDataset(spec["dataset"], "Training", usual_transforms(True))
    val_set = UsualFerDataset(spec["dataset"], "PublicTest", usual_transforms(False))
    load_s = time.perf_counter() - started
    torch.manual_seed(0)
    model, _ = build_model(spec["model"], "no")
    model.to(device).train()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=0.1)
    criterion = torch.nn.CrossEntropyLoss()
    warmup, steps = 4 * spec["warmup"], 2 * spec["steps"]
    with warnings.catch_warnings():  # "4 workers on 2 cores": deliberate, it is the reference
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        batches = forever(DataLoader(train_set, batch_size=USUAL["batch_size"], shuffle=True,
                                     num_workers=USUAL["num_workers"]))
        images = 0
        try:
            for step in range(warmup + steps):
                if step == warmup:
                    sync(device)
                    t0 = time.perf_counter()
                inputs, targets = next(batches)
                inputs, targets = inputs.to(device), targets.to(device)
                optimizer.zero_grad()
                loss = criterion(model(inputs), targets)
                loss.backward()
                optimizer.step()
                loss.item()
                images += len(targets) if step >= warmup else 0
            sync(device)
            t1 = time.perf_counter()
        finally:
            batches.close()  # the loader's worker processes end
    n = min(spec["eval_images"], len(val_set))
    faces = forever(DataLoader(val_set, batch_size=USUAL["eval_batch_size"], shuffle=False))
    model.eval()
    with torch.no_grad():
        for i in range(4 * spec["warmup"] + n):
            if i == 4 * spec["warmup"]:
                sync(device)
                e0 = time.perf_counter()
            inputs, targets = next(faces)
            model(inputs.to(device)).argmax(1).eq(targets.to(device)).sum().item()
        sync(device)
        e1 = time.perf_counter()
    return {"train_img_s": images / (t1 - t0), "train_images": images, "train_seconds": t1 - t0,
            "eval_img_s": n / (e1 - e0), "eval_images": n, "eval_seconds": e1 - e0,
            "data_load_s": load_s, "batch_size": USUAL["batch_size"],
            "eval_batch_size": USUAL["eval_batch_size"], "optimizer": USUAL["optimizer"],
            "amp_dtype": None, "reuse_freed_memory": False}


# ----------------------------------------------------------------------------- children

def child_main(spec_json):
    """One measurement in this (fresh) process; its result on the last line of stdout."""
    spec = json.loads(spec_json)
    result = measure_usual(spec) if spec["variant"] == "usual" else measure_ours(spec)
    print(RESULT + json.dumps(dict(spec, **result)), flush=True)
    return 0


def run_child(spec):
    """Measure `spec` in a fresh Python process running this file."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 130:
        raise KeyboardInterrupt
    if proc.returncode != 0 or not lines or not lines[-1].startswith(RESULT):
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
        raise UserError(f"measuring {spec['variant']} {spec['model']} failed "
                        f"(exit code {proc.returncode}): {tail}")
    return json.loads(lines[-1][len(RESULT):])


# ----------------------------------------------------------------------------- report

def median_of(runs, key):
    values = [r[key] for r in runs]
    return statistics.median(values) if values else None


def summarise(runs, gflops):
    """Per model and variant: the medians and every run's value; the ratios between variants."""
    models = {}
    for name, g in gflops.items():
        entry = {"gflop_per_image": g, "variants": {}}
        for variant in VARIANTS:
            mine = [r for r in runs if r["model"] == name and r["variant"] == variant]
            if mine:
                entry["variants"][variant] = {
                    "train_img_s": median_of(mine, "train_img_s"),
                    "eval_img_s": median_of(mine, "eval_img_s"),
                    "train_gflop_s": median_of(mine, "train_img_s") * 3 * g,
                    "train_img_s_runs": [r["train_img_s"] for r in mine],
                    "eval_img_s_runs": [r["eval_img_s"] for r in mine]}
        ours = entry["variants"].get("ours")
        for variant in VARIANTS[1:]:
            other = entry["variants"].get(variant)
            if ours and other:
                # > 1: ours is faster than the variant (for the hacks: what the hack gains). Also per
                # repeat, ours against the variant measured next to it, and the median of those.
                pairs = [(a["train_img_s"] / b["train_img_s"]) for a in runs for b in runs
                         if a["model"] == b["model"] == name and a["variant"] == "ours"
                         and b["variant"] == variant and a.get("repeat") == b.get("repeat")]
                entry[f"ours_vs_{variant}"] = {
                    **{kind: ours[f"{kind}_img_s"] / other[f"{kind}_img_s"] for kind in ("train", "eval")},
                    "train_per_repeat": pairs, "train_per_repeat_median": statistics.median(pairs)}
        models[name] = entry
    return models


def table(models):
    rows = ["| model | variant | train img/s (median) | runs | eval img/s (median) | train GFLOP/s | "
            "ours / variant, train | per repeat (median) | ours / variant, eval |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for name, entry in models.items():
        for variant, v in entry["variants"].items():
            ratio = entry.get(f"ours_vs_{variant}", {})
            rows.append(f"| {name} | {variant} | {v['train_img_s']:.1f} | "
                        + " ".join(f"{x:.1f}" for x in v["train_img_s_runs"])
                        + f" | {v['eval_img_s']:.1f} | {v['train_gflop_s']:.1f} | "
                        + (f"{ratio['train']:.2f}x | " + " ".join(f"{x:.2f}" for x in ratio["train_per_repeat"])
                           + f" ({ratio['train_per_repeat_median']:.2f}x) | {ratio['eval']:.2f}x |"
                           if ratio else "- | - | - |"))
    return "\n".join(rows)


# ----------------------------------------------------------------------------- main

def get_args_parser():
    from models import MODEL_NAMES
    p = argparse.ArgumentParser(prog="tools/bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--section", choices=tuple(SECTIONS), default="train",
                   help="what to measure: train (this file); video and onnx are "
                        "tools/bench_video.py and tools/bench_onnx.py")
    p.add_argument("-d", "--dataset", default=DEFAULT_CSV, help="a FER2013 CSV, or 'synthetic'")
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    p.add_argument("--steps", type=int, default=10,
                   help="timed training steps of ours (batch 128); the usual pipeline gets 2x as "
                        "many (batch 16)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps first; the usual pipeline gets 4x as many")
    p.add_argument("--eval_images", type=int, default=1024, help="validation faces timed per evaluation")
    p.add_argument("--repeats", type=int, default=1, help="measurements of each variant (median shown)")
    p.add_argument("--compare_reuse", action="store_true",
                   help="also measure ours without utils.reuse_freed_memory")
    p.add_argument("--compare_prelu", action="store_true",
                   help="also measure ours with torch.nn.PReLU in place of models.PReLU")
    p.add_argument("--teacher", nargs="+", metavar="FILE",
                   help="also measure ours distilling from these teachers (run.py --teacher)")
    p.add_argument("--skip_usual", action="store_true", help="do not measure the usual pipeline")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    p.add_argument("--amp", action="store_true", help="ours with run.py --amp (bf16 autocast); without it, ours runs --no-amp (fp32)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: run.py's default, all cores)")
    p.add_argument("--out", default="outputs/bench.json", help="JSON file to write")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def main(argv):
    args, rest = get_args_parser().parse_known_args(argv)
    if args.child is not None:
        return child_main(args.child)
    if SECTIONS[args.section] is not None:
        script = os.path.join(TOOLS, SECTIONS[args.section])
        if not os.path.exists(script):
            raise UserError(f"--section {args.section} is measured by tools/{SECTIONS[args.section]}, "
                            "which is not written yet")
        rest = [a for a in argv if a != "--section" and a != args.section and not a.startswith("--section=")]
        return subprocess.call([sys.executable, script, *rest])
    if rest:
        raise UserError(f"unrecognised arguments: {' '.join(rest)}")
    if min(args.steps, args.warmup, args.eval_images, args.repeats) < 1 or args.threads < 0:
        raise UserError("--steps, --warmup, --eval_images and --repeats must be at least 1, "
                        "--threads 0 or more")
    return bench_train(args, argv)


def bench_train(args, argv):
    import dataset
    from models import FerNet, gflops_per_image
    from utils import check_writable
    check_writable(os.path.dirname(os.path.abspath(args.out)))
    path = os.path.abspath(dataset.resolve_path(args.dataset))
    dataset.load_fer2013(path)  # decode it into the cache once, so that no child pays the parse
    variants = (["ours"] + ["no_reuse"] * args.compare_reuse + ["torch_prelu"] * args.compare_prelu
                + ["distil"] * bool(args.teacher) + ["usual"] * (not args.skip_usual))
    teachers = [os.path.abspath(t) for t in args.teacher or []]
    gflops = {name: gflops_per_image(FerNet(name)) for name in args.models}
    report = {"section": "train", "command": ["python3", "tools/bench.py", *argv],
              "machine": machine_info(), "settings": {k: v for k, v in vars(args).items() if k != "child"},
              "dataset": path, "usual_pipeline": USUAL, "runs": [], "models": {}}
    say(f"bench on {report['machine']['cpu']} ({report['machine']['cores']} cores, torch "
        f"{torch.__version__}): {', '.join(variants)} x {len(args.models)} models x {args.repeats} repeats")
    if "warning" in report["machine"]:
        say(f"warning: {report['machine']['warning']}")
    started = time.perf_counter()
    for repeat in range(args.repeats):
        shift = repeat % len(variants)
        for name in args.models:
            for variant in variants[shift:] + variants[:shift]:
                spec = {"model": name, "variant": variant, "repeat": repeat, "dataset": path,
                        "device": args.device, "amp": args.amp, "threads": args.threads,
                        "steps": args.steps, "warmup": args.warmup, "eval_images": args.eval_images,
                        "teacher": teachers}
                result = run_child(spec)
                say(f"repeat {repeat + 1}/{args.repeats}  {name:15s} {variant:12s} train "
                    f"{result['train_img_s']:7.1f} img/s   eval {result['eval_img_s']:7.1f} img/s")
                report["runs"].append(result)
                report["models"] = summarise(report["runs"], gflops)
                report["seconds"] = time.perf_counter() - started
                save_json(report, args.out)
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    save_json(report, args.out)
    say("")
    say(table(report["models"]))
    say(f"\n{report['machine']['cpu']}, {args.repeats} repeat(s); {report['seconds']:.0f} s in all; "
        f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
