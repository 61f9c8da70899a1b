"""PublicTest accuracy against epochs for several training runs, on one chart, plus each run's
history as JSON: what README's results section shows for the long runs while they go on.

    python3 tools/runs_chart.py RUN_LAST.pth [RUN_LAST.pth ...] -o results/publictest_accuracy.png

Each checkpoint (a *_last.pth, or a run folder) gives one line, labelled with its model and
planned epochs; its history is written beside the chart as <run name>_history.json.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules

import checkpoint  # noqa: E402
from utils import Parser, run_cli, save_figure, save_json  # noqa: E402


def run_summary(path):
    """(label, history, description dict) of one run's checkpoint."""
    ckpt = checkpoint.load(checkpoint.resolve(path, "last"))
    state = checkpoint.train_state(ckpt, path)
    args = ckpt["args"]
    label = f"{ckpt['model_name']} ({args['epoch_num']} epochs planned)"
    best = max(state.history, key=lambda h: h["val_acc"]) if state.history else None
    description = {
        "run_name": ckpt["run_name"], "model": ckpt["model_name"],
        "epochs_planned": args["epoch_num"],
        "epochs_validated": state.history[-1]["epoch"] if state.history else 0,
        "seconds": round(state.elapsed), "ema_decay": args.get("ema_decay", 0.0),
        "best_publictest_acc": best and best["val_acc"], "best_epoch": best and best["epoch"],
        "history": state.history}
    return label, state.history, description


def main(argv):
    parser = Parser(prog="runs_chart.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="checkpoints (*_last.pth) or run folders")
    parser.add_argument("-o", "--output", default="results/publictest_accuracy.png", help="the chart")
    args = parser.parse_args(argv)
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for path in args.runs:
        label, history, description = run_summary(path)
        ax.plot([h["epoch"] for h in history], [100 * h["val_acc"] for h in history], label=label)
        save_json(description, os.path.join(os.path.dirname(args.output) or ".",
                                            f"{description['run_name']}_history.json"))
    ax.set_xlabel("epoch")
    ax.set_ylabel("PublicTest accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
