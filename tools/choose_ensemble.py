"""Choose an ensemble and its test-time augmentation on PublicTest, as the protocol asks: every
subset of the given checkpoints, with each TTA, ranked by PublicTest accuracy. PrivateTest is not
looked at: the JSON ends with the one infer.py command that reports the pick on it.

    python3 tools/choose_ensemble.py -c RUN1/A_best.pth RUN2/B_best.pth RUN3/C_best.pth \\
        -d fer2013.csv.gz -o results/ensemble_choice.json

Each model classifies PublicTest once per TTA view; the subsets only average those
probabilities, so ten checkpoints (1,023 subsets) cost no more than ten evaluations. Single
checkpoints are ranked too, for comparison; the pick is the best subset of at least
--min_members. Ties go to fewer members, then to the cheaper TTA.
"""
import itertools
import os
import shlex
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's modules

import checkpoint  # noqa: E402
import dataset  # noqa: E402
import predict  # noqa: E402
from utils import (Parser, autocast_dtype, check_writable, device_flags, flag, run_cli, save_json,  # noqa: E402
                   select_device)

MAX_CHECKPOINTS = 12  # 4,095 subsets


def rank_subsets(probs, labels, names, modes):
    """[{members, tta, accuracy}] for every non-empty subset of `names` and every mode, best first.

    probs[mode][i]: checkpoint i's probabilities (N, 7) on the faces whose true classes are `labels`."""
    rows = []
    for size in range(1, len(names) + 1):
        for subset in itertools.combinations(range(len(names)), size):
            for mode in modes:
                mean = sum(probs[mode][i] for i in subset) / size
                rows.append({"members": [names[i] for i in subset], "tta": mode,
                             "accuracy": float((mean.argmax(1) == labels).mean())})
    return sorted(rows, key=lambda r: (-r["accuracy"], len(r["members"]), modes.index(r["tta"])))


def main(argv):
    parser = Parser(prog="choose_ensemble.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--checkpoint", nargs="+", required=True, metavar="PATH",
                        help="checkpoints (.pth, .onnx or run folders) to choose from")
    parser.add_argument("-d", "--dataset", required=True, help="FER2013-layout CSV, or 'synthetic'")
    flag(parser, "--skip_bad_rows", action="store_true", help="drop malformed CSV rows (with a warning that counts them)")
    parser.add_argument("--tta", nargs="+", choices=predict.TTA_MODES, default=list(predict.TTA_MODES),
                        help="the TTA modes to try (default: all)")
    flag(parser, "--min_members", type=int, default=2, help="members of the pick, at least (default: 2)")
    parser.add_argument("-o", "--output", default="outputs/ensemble_choice.json", help="the ranking, as JSON")
    flag(parser, "--batch_size", type=int, default=None, help="faces per batch (default: 64 on a CPU, 512 on a GPU)")
    device_flags(parser)
    args = parser.parse_args(argv)
    if os.path.isdir(args.dataset):
        parser.error(f"-d {args.dataset} is a folder: the ranking is on FER2013's PublicTest, so -d takes a "
                     "FER2013-layout CSV or 'synthetic'")
    files = [os.path.realpath(checkpoint.resolve(p)) for p in args.checkpoint]  # RUN/ and RUN/x_best.pth agree
    if len(set(files)) != len(files):
        parser.error("a checkpoint is given twice")
    if not 1 <= args.min_members <= len(args.checkpoint):
        parser.error(f"--min_members must be 1 to {len(args.checkpoint)} (the checkpoints given)")
    if len(args.checkpoint) > MAX_CHECKPOINTS:
        parser.error(f"at most {MAX_CHECKPOINTS} checkpoints")
    modes = [m for m in predict.TTA_MODES if m in args.tta]  # cheapest first, for the ties
    check_writable(os.path.dirname(os.path.abspath(args.output)))  # before the slow part
    device = select_device(args.device)
    models = predict.load_models(args.checkpoint, device)
    predict.require_emotions(models, "the labels of FER2013's PublicTest")  # a folder-trained model's differ
    images, labels = dataset.load_fer2013(args.dataset, args.skip_bad_rows).split("val")

    probs = {mode: [] for mode in modes}
    amp_dtype = autocast_dtype(args.amp, device)
    with predict.autocast(device, amp_dtype):
        for path, model in zip(args.checkpoint, models):
            print(f"PublicTest ({len(labels)} faces): {path}, TTA {', '.join(modes)}", flush=True)
            for mode, p in predict.predict_modes([model], images, modes, args.batch_size, device).items():
                probs[mode].append(p)
    ranking = rank_subsets(probs, np.asarray(labels), args.checkpoint, modes)
    pick = next(r for r in ranking if len(r["members"]) >= args.min_members)
    single = next(r for r in ranking if len(r["members"]) == 1)

    print(f"\n{'PublicTest acc':>14}  {'TTA':<8} members")
    for r in ranking[:10]:
        print(f"{r['accuracy']:14.2%}  {r['tta']:<8} {' + '.join(r['members'])}")
    command = (f"python3 infer.py --checkpoint {' '.join(map(shlex.quote, pick['members']))} "
               f"-d {shlex.quote(args.dataset)} --split test --tta {pick['tta']}")
    print(f"\npick: {' + '.join(pick['members'])}, TTA {pick['tta']}: {pick['accuracy']:.2%} on PublicTest "
          f"(best single: {single['members'][0]}, TTA {single['tta']}, {single['accuracy']:.2%})\n"
          f"report it once on PrivateTest with:\n  {command}")
    if single["accuracy"] > pick["accuracy"]:
        print(f"note: on PublicTest the best single checkpoint beats every ensemble of {args.min_members} or more")
    save_json({"split": "PublicTest", "faces": len(labels), "dataset": args.dataset,
               "evaluation": str(amp_dtype).split(".")[-1] + " autocast" if amp_dtype else "fp32",
               "pick": pick, "best_single": single, "privatetest_command": command,
               "ranking": ranking}, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
