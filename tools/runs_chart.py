"""PublicTest accuracy against epochs for several training runs, on one chart, plus each run's
history as JSON: what README's results section shows for the long runs while they go on.

    python3 tools/runs_chart.py RUN_LAST.pth [RUN_LAST.pth | HISTORY.json ...] -o results/publictest_accuracy.png

Each checkpoint (a *_last.pth, or a run folder) gives one line, labelled with its model and
planned epochs, and its history is written beside the chart as <run name>_history.json. A JSON
file that holds a "history" (those files, or a results/<model>.json) is drawn as it is, so the
chart can be redrawn from committed files alone. Where a run kept a weight average, the raw
weights' accuracy is drawn dashed in the same colour.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules

import checkpoint  # noqa: E402
from utils import Parser, UserError, run_cli, save_figure, save_json  # noqa: E402


def run_summary(path):
    """The description dict of one run's checkpoint: what <run name>_history.json holds."""
    ckpt = checkpoint.load(checkpoint.resolve(path, "last"))
    state = checkpoint.train_state(ckpt, path)
    args = ckpt["args"]
    best = max(state.history, key=lambda h: h["val_acc"]) if state.history else None
    return {
        "run_name": ckpt["run_name"], "model": ckpt["model_name"],
        "epochs_planned": args["epoch_num"],
        "epochs_validated": state.history[-1]["epoch"] if state.history else 0,
        "seconds": round(state.elapsed), "ema_decay": args.get("ema_decay", 0.0),
        "best_publictest_acc": best and best["val_acc"], "best_epoch": best and best["epoch"],
        "teachers": [os.path.basename(t) for t in args.get("teacher") or []],
        "seed": args.get("seed"), "history": state.history}


def read_history_json(path):
    """A saved description: a JSON object with a list "history" of validations."""
    try:
        with open(path) as f:
            description = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} as JSON: {err}") from err
    history = description.get("history") if isinstance(description, dict) else None
    if not isinstance(history, list) or not all(isinstance(h, dict) and "epoch" in h and "val_acc" in h
                                                for h in history):
        raise UserError(f"{path} holds no validation history (a list \"history\" of "
                        "{\"epoch\", \"val_acc\", ...} entries)")
    return description


def run_label(run):
    """The legend entry: the run's name first, since runs of one model differ by more than the
    model (a teacher, alpha, mixup: the names say which), then what the history records."""
    details = [f"{run.get('epochs_planned', '?')} epochs planned"]
    if run.get("seed"):
        details.append(f"seed {run['seed']}")
    if run.get("teachers"):
        details.append(f"distilled from {len(run['teachers'])}")
    if run.get("run_name"):
        return f"{run['run_name']} ({run.get('model', '?')}, {', '.join(details)})"
    return f"{run.get('model', '?')} ({', '.join(details)})"


def main(argv):
    parser = Parser(prog="runs_chart.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="checkpoints (*_last.pth), run folders or history JSON files")
    parser.add_argument("-o", "--output", default="results/publictest_accuracy.png", help="the chart")
    args = parser.parse_args(argv)
    # Everything is read before anything is written.
    runs = [(read_history_json(path), False) if path.endswith(".json") else (run_summary(path), True)
            for path in args.runs]
    for description, from_checkpoint in runs:
        if from_checkpoint:
            save_json(description, os.path.join(os.path.dirname(args.output) or ".",
                                                f"{description['run_name']}_history.json"))
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 6))
    ax = fig.subplots()
    raw_drawn = False
    for run, _ in runs:
        history = run["history"]
        epochs = [h["epoch"] for h in history]
        line, = ax.plot(epochs, [100 * h["val_acc"] for h in history], label=run_label(run))
        if any("val_acc_raw" in h for h in history):
            ax.plot(epochs, [100 * h.get("val_acc_raw", float("nan")) for h in history], "--",
                    color=line.get_color(), alpha=0.6, linewidth=0.8)
            raw_drawn = True
    if raw_drawn:  # one legend entry for all the dashed lines
        ax.plot([], [], "--", color="grey", linewidth=0.8, label="dashed: the same run's raw weights (no average)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("PublicTest accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")  # the curves rise above 60% within 5 epochs
    fig.tight_layout()
    save_figure(fig, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
