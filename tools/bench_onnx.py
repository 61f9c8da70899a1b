"""onnxruntime against PyTorch on this CPU: faces per second for each model at batch 1 (one
photo's face) and batch 64 (infer.py's CPU batch), and how far their probabilities differ on real
faces.

    python3 tools/bench_onnx.py --json results/bench_onnx.json          # FER2013 PrivateTest faces
    python3 tools/bench_onnx.py -d synthetic --models vgg2_0_2 --seconds 0.5  # quick look

For each model: PyTorch in the default NCHW layout (fp32, eval, torch.inference_mode), PyTorch
with channels-last weights and inputs (as infer.py runs it, predict.load_models), and the exported ONNX file in onnxruntime (CPU provider,
through onnx_model.OnnxModel, the wrapper infer.py uses, so its tensor<->numpy copies count).
All use the same number of threads (torch.get_num_threads(), or --threads). The three are timed
in turns, `--rounds` times, and each keeps its median round: a load that comes and goes on a
shared machine hits all three alike.

Weights: the trained checkpoints under pretrained/ where there is one (fer2013_<model>.pth), else
random weights whose BatchNorm statistics are measured on the faces (so the answers vary from face
to face as a trained model's do). The difference column is the largest |probability difference|
between onnxruntime and PyTorch over all the faces (`--n_real`, default all of the split).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.common import ROOT, machine_info  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import checkpoint  # noqa: E402
import dataset  # noqa: E402
import predict  # noqa: E402
import onnx_model  # noqa: E402
from models import MODEL_NAMES, FerNet  # noqa: E402
from utils import SPLITS, save_json  # noqa: E402

BATCHES = (1, 64)
BACKENDS = ("pytorch", "pytorch_channels_last", "onnxruntime")


def model_for(name, faces, seed=0):
    """(model in eval mode, 'trained: <file>' or 'random') as described in the module docstring."""
    shipped = os.path.join(ROOT, "pretrained", f"fer2013_{name}.pth")
    if os.path.exists(shipped):
        return checkpoint.build_model(checkpoint.load(shipped)), f"trained: {os.path.basename(shipped)}"
    torch.manual_seed(seed)
    model = FerNet(name)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.from_numpy(faces[:256]).float().div(255).unsqueeze(1))
    return model.eval(), "random"


def _time_once(fn, x, seconds):
    """Seconds per call of fn(x), the median of the calls made in about `seconds`."""
    times, start = [], time.perf_counter()
    while not times or (time.perf_counter() - start < seconds and len(times) < 10_000):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_model(name, faces, seconds=2.0, rounds=3, threads=None):
    """img/s of each backend at each batch size, and the largest probability difference between
    onnxruntime and PyTorch over `faces` (uint8 N x 48 x 48)."""
    model, weights = model_for(name, faces)
    channels_last = FerNet(name)
    channels_last.load_state_dict(model.state_dict())
    channels_last = channels_last.eval().to(memory_format=torch.channels_last)
    with tempfile.TemporaryDirectory() as folder:
        path = onnx_model.export(model, os.path.join(folder, f"{name}.onnx"))
        ort = onnx_model.OnnxModel(path, threads=threads)

    def run_pytorch(x):
        with torch.inference_mode():
            return model(x)

    def run_channels_last(x):
        with torch.inference_mode():
            return channels_last(x.contiguous(memory_format=torch.channels_last))

    runs = {"pytorch": run_pytorch, "pytorch_channels_last": run_channels_last, "onnxruntime": ort}
    speed = {}
    for batch in BATCHES:
        x = torch.from_numpy(faces[:batch]).float().div(255).unsqueeze(1)
        for fn in runs.values():  # warm-up: first-call allocations and kernel choices
            fn(x)
            fn(x)
        per_call = {backend: [] for backend in runs}
        for _ in range(rounds):
            for backend, fn in runs.items():
                per_call[backend].append(_time_once(fn, x, seconds / rounds))
        speed[batch] = {backend: batch / statistics.median(t) for backend, t in per_call.items()}
    p_torch = predict.predict([model], faces, batch_size=64)
    p_ort = predict.predict([ort], faces, batch_size=64)
    return {"model": name, "weights": weights, "img_s": {str(b): s for b, s in speed.items()},
            "max_abs_prob_diff": float(np.abs(p_torch - p_ort).max()),
            "argmax_agreement": float((p_torch.argmax(1) == p_ort.argmax(1)).mean()),
            "faces_compared": int(len(faces))}


def table(results):
    rows = ["| model | weights | batch | PyTorch NCHW img/s | PyTorch channels-last img/s | onnxruntime "
            "img/s | onnxruntime / channels-last (how infer.py runs) | max abs prob. difference |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        for batch, s in r["img_s"].items():
            rows.append(f"| {r['model']} | {r['weights'].split(':')[0]} | {batch} | "
                        f"{s['pytorch']:,.0f} | {s['pytorch_channels_last']:,.0f} | "
                        f"{s['onnxruntime']:,.0f} | {s['onnxruntime'] / s['pytorch_channels_last']:.2f}x | "
                        f"{r['max_abs_prob_diff']:.1e} |")
    return "\n".join(rows)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-d", "--dataset", default="/work/shared/data/fer2013.csv.gz"
                   if os.path.exists("/work/shared/data/fer2013.csv.gz") else "./data/fer2013.csv",
                   help="FER2013-layout CSV whose faces are used, or 'synthetic'")
    p.add_argument("--split", choices=tuple(SPLITS), default="test")
    p.add_argument("--n_real", type=int, default=0, help="faces compared (0: the whole split)")
    p.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    p.add_argument("--seconds", type=float, default=3.0,
                   help="timing per backend, model and batch size (split over the rounds)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="threads for both (0: PyTorch's default)")
    p.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = dataset.load_fer2013(args.dataset, log=lambda *a: None)
    faces = data.split(args.split)[0]
    faces = np.ascontiguousarray(faces[:args.n_real] if args.n_real else faces)
    import onnxruntime
    info = machine_info(onnxruntime=onnxruntime.__version__)
    print(f"{info['cpu']}, {info['cores']} cores, {info['torch_threads']} threads; torch {info['torch']}, "
          f"onnxruntime {info['onnxruntime']}; load average {info['load_average_at_start']}")
    print(f"{len(faces)} faces of {args.dataset} ({args.split})", flush=True)
    results = []
    for name in args.models:
        results.append(measure_model(name, faces, args.seconds, args.rounds, torch.get_num_threads()))
        r = results[-1]
        print(f"  {name}: " + ", ".join(
            f"batch {b}: PyTorch {s['pytorch']:.0f}, channels-last {s['pytorch_channels_last']:.0f}, "
            f"onnxruntime {s['onnxruntime']:.0f} img/s" for b, s in r["img_s"].items())
            + f"; max |dp| {r['max_abs_prob_diff']:.1e}", flush=True)
    print(table(results))
    if args.json:
        save_json({"machine": info, "dataset": os.path.basename(args.dataset), "split": args.split,
                   "settings": {k: v for k, v in vars(args).items() if k != "json"},
                   "results": results, "table": table(results)}, args.json)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
