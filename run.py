"""Train one of the five models on FER2013 (or a folder of face images), select on PublicTest,
then test on PrivateTest (a folder's val and test splits).

This file is the one place that decides when to validate, stop and save (train.py holds the
steps, checkpoint.py the files): torchvision's classification reference drives its
train_one_epoch the same way.
"""
if __name__ == "__main__":  # Ctrl-C while the imports load (a second or more) just ends the
    import signal  # process, without a traceback; utils.run_cli makes it KeyboardInterrupt again
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import contextlib
import csv
import functools
import glob
import io
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import checkpoint
import dataset
import folders
import predict
import report
import train
from models import MODEL_NAMES, build_model, fit_classes
from utils import (DEFAULT_CSV, Parser, UserError, atomic_write, autocast_dtype, clip, check_writable, device_flags, flag,
                   eval_batch_size, file_sha256, one_of, path_arg, reuse_freed_memory, run_cli, save_figure, save_json,
                   seed_everything, select_device)

DEFAULT_MODEL = "vgg2_4_2_conv3"
DEFAULT_OUTPUT = "./outputs"
# Learning rates that work with the default batch size (128), per optimiser.
DEFAULT_LR = {"sgd": 0.02, "adamw": 1e-3, "adadelta": 0.1}
# The built-in synthetic faces (`-d synthetic`, 4,000 training faces) learn in a few epochs;
# random erasing hides the mouth, which carries most of their drawn expression.
SYNTHETIC_DEFAULTS = {"epoch_num": 6, "erase_p": 0.0}  # conv3: 92.8% on its test split
# What announce() writes before the first checkpoint; release() removes them when none was saved.
START_FILES = ("args.json", folders.SPLIT_FILE, folders.LEFT_OUT_FILE)
# Flags that may differ when a run is resumed without changing what it computes. -d: the same
# data at another path (checked against the class counts saved in the checkpoint); -o is always
# the resuming command's (typed or its default), listed so that typing it draws no note;
# --teacher: the same teacher files at other paths (checked against their saved sha256).
RESUME_OVERRIDES = ("device", "threads", "num_save", "eval_batch_size", "debug", "epoch_num",
                    "patience", "output", "dataset", "teacher")

EXAMPLES = """examples:
  python3 run.py -m vgg2_4_2_conv3 -d synthetic            # built-in faces, no download
  python3 run.py -m vgg2_4_2_conv3                         # FER2013 at ./data/fer2013.csv
  python3 run.py -m vgg2_2_2 -d fer2013.csv.gz --amp --weighted_loss
  python3 run.py --checkpoint checkpoint/RUN/vgg2_2_2_last.pth     # resume where it stopped
  python3 run.py -m vgg2_4_2_conv3 --init_from pretrained/fer2013_vgg2_4_2_conv3.pth   # fine-tune
  python3 run.py -d my_faces/ --init_from pretrained/fer2013_vgg2_4_2_conv5.pth   # your own images
  torchrun --nproc_per_node 8 run.py -m vgg2_4_2_conv3              # several GPUs

Each run gets its own folders, checkpoint/RUN/ and outputs/RUN/ (RUN = model and start time)."""


def get_args_parser():
    p = Parser(prog="run.py", description="Train a VGG11-prefix facial-emotion model on FER2013, then test it.",
               epilog=EXAMPLES)
    g = p.add_argument_group("data")
    flag(g, "-d", "--dataset", type=path_arg, default=DEFAULT_CSV,
         help="FER2013 CSV (.csv/.gz/.xz/.zip), 'synthetic' for the built-in faces, or a folder of "
              "images, DIR/<class>/* or DIR/<split>/<class>/* (default: %(default)s)")
    flag(g, "--skip_bad_rows", action="store_true", help="drop malformed CSV rows (with a warning)")
    dataset.faces_flag(g)

    g = p.add_argument_group("model")
    flag(g, "-m", "--model", type=one_of(MODEL_NAMES, "model"), default=None, metavar="MODEL",
         help=f"one of {', '.join(MODEL_NAMES)} (default: {DEFAULT_MODEL}; on resume: the run's)")
    flag(g, "--pretrained", choices=("auto", "yes", "no"), default="auto",
         help="ImageNet weights for the VGG11-BN prefix; auto uses them when cached or "
              "downloadable (default: %(default)s)")

    add_recipe_flags(p)

    g = p.add_argument_group("checkpoints and outputs")
    flag(g, "--checkpoint", type=path_arg, default=None, metavar="FILE",
         help="resume this run (a *_last.pth file, or the run's folder)")
    flag(g, "--init_from", type=path_arg, default=None, metavar="FILE",
         help="start a new run (-m) from the weights in this checkpoint or export (fine-tuning)")
    flag(g, "--checkpoint_dir", type=path_arg, default="./checkpoint",
         help="folder for the run folders of checkpoints (default: %(default)s)")
    flag(g, "-o", "--output", type=path_arg, default=DEFAULT_OUTPUT,
         help="folder for outputs (default: %(default)s)")
    flag(g, "--run_name", default=None, help="name of the run folders (default: MODEL_TIME)")
    flag(g, "--num_save", type=int, default=16, help="test faces saved as images (default: 16)")

    g = p.add_argument_group("hardware")
    device_flags(g)
    flag(g, "--threads", "--num_workers", type=int, default=0, dest="threads",
         help="CPU threads for PyTorch (default: 0, all cores; the data needs no worker processes)")
    flag(g, "--eval_batch_size", type=int, default=None,
         help="batch size for validation and the test (default: 64 on a CPU, 512 on a GPU)")
    flag(g, "--channels_last", action=argparse.BooleanOptionalAction, default=True,
         help="channels-last memory format (about 2.5x faster convolutions on CPUs; default: on)")
    flag(g, "--compile", action="store_true", help="torch.compile the model")
    flag(g, "--sync_bn", action="store_true", help="synchronised BatchNorm under torchrun")
    flag(g, "--seed", type=int, default=0, help="seed; CPU runs repeat exactly (default: 0)")
    flag(g, "--debug", action="store_true", help="show Python tracebacks on errors")
    return p


def add_recipe_flags(p):
    """The flags that shape what is learnt: optimisation, schedule, distillation, augmentation."""
    g = p.add_argument_group("optimisation")
    flag(g, "--optimizer", choices=sorted(DEFAULT_LR), default="sgd",
         help="sgd = SGD with Nesterov momentum; adadelta is the classic recipe (default: sgd)")
    flag(g, "--momentum", type=float, default=0.9, help="SGD's Nesterov momentum (default: %(default)s)")
    flag(g, "--lr", type=float, default=None,
         help="peak learning rate (default: sgd 0.02, adamw 1e-3, adadelta 0.1)")
    flag(g, "--batch_size", type=int, default=128, help="training batch size per process (default: 128)")
    flag(g, "--weight_decay", type=float, default=5e-4,
         help="L2 weight decay, not on BatchNorm/PReLU/biases (default: %(default)s)")
    flag(g, "--label_smoothing", type=float, default=0.1, help="cross-entropy smoothing (default: 0.1)")
    flag(g, "--weighted_loss", "--wl", action="store_true", dest="wl",
         help="weight the loss by inverse class frequency of the Training split")
    flag(g, "--ema_decay", type=float, default=0.999,
         help="validate, select and ship an exponential moving average of the weights with this "
              "per-step decay; 0 turns it off (default: %(default)s)")
    flag(g, "--ema_warmup", type=float, default=10.0,
         help="the average's decay after n steps is min(ema_decay, (1 + n) / (ema_warmup + n)), as "
              "TensorFlow's ExponentialMovingAverage (default: %(default)g)")

    g = p.add_argument_group("schedule and stopping")
    flag(g, "--epoch_num", "--epochs", type=int, default=50, help="number of epochs (default: 50)")
    flag(g, "--scheduler", choices=("cosine", "plateau", "none"), default="cosine",
         help="cosine: warm-up then cosine decay to 0 over epoch_num; plateau: multiply the lr by "
              "--plateau_factor after --plateau_patience bad validations (default: cosine)")
    flag(g, "--warmup_epochs", type=float, default=1.0, help="linear warm-up, cosine only (default: 1)")
    flag(g, "--plateau_patience", type=int, default=3, help="bad validations per lr cut (default: 3)")
    flag(g, "--plateau_factor", type=float, default=0.5, help="lr multiplier per cut (default: 0.5)")
    flag(g, "--patience", type=int, default=10,
         help="stop after this many validations without improvement (default: 10)")
    flag(g, "--early_stop", choices=("loss", "acc"), default="loss",
         help="validation metric for early stopping and the best checkpoint (default: loss)")
    flag(g, "--num_epoch_to_validate", "--validate_every_epochs", type=int, default=1,
         help="validate every N epochs (default: 1)")
    flag(g, "--num_iter_to_validate", "--validate_every_steps", type=int, default=0,
         help="validate every N training steps instead (default: 0, off)")

    g = p.add_argument_group("distillation")
    flag(g, "--teacher", nargs="+", type=path_arg, default=None, metavar="FILE",
         help="distil from these trained models (checkpoints or exports, .pth): the student also "
              "learns their averaged softened probabilities on the same augmented faces")
    # Defaults from Hinton et al. 2015 as used by the CRD benchmark's KD baseline (Tian et al.,
    # ICLR 2020: T = 4, alpha = 0.9).
    flag(g, "--kd_alpha", type=float, default=0.9,
         help="weight of the teachers' soft targets; 1 - alpha goes to the labels (default: %(default)s)")
    flag(g, "--kd_temperature", type=float, default=4.0,
         help="softmax temperature of the soft targets (default: %(default)s)")
    flag(g, "--hold_out", type=int, nargs=2, default=None, metavar=("FOLD", "FOLDS"),
         help="train without fold FOLD (0 .. FOLDS-1) of the training faces, split into FOLDS by a "
              "fixed shuffle: a teacher for faces it has never seen. A student distilled from such "
              "teachers gets each face's soft target from those that held out its fold (and from "
              "teachers trained on every face)")

    g = p.add_argument_group("augmentation (batched, see train.augment)")
    flag(g, "--max_rotate", type=float, default=10.0, help="largest rotation, degrees (default: %(default)g)")
    flag(g, "--max_shift", type=float, default=0.1,
         help="largest shift, as a share of the face's side (default: %(default)g)")
    flag(g, "--scale", type=float, nargs=2, default=(0.9, 1.1), metavar=("MIN", "MAX"),
         help="zoom range (default: 0.9 1.1)")
    flag(g, "--erase_p", type=float, default=0.5, help="probability of random erasing (default: 0.5)")
    flag(g, "--erase_area", type=float, nargs=2, default=(0.02, 0.2), metavar=("MIN", "MAX"),
         help="the erased rectangle's area, as a share of the face (default: 0.02 0.2)")
    flag(g, "--erase_ratio", type=float, default=3.0,
         help="the erased rectangle's aspect ratio lies in [1/R, R] (default: %(default)g)")
    flag(g, "--mixup", type=float, default=0.0, metavar="ALPHA",
         help="blend each training face with another of its batch, weight ~ Beta(ALPHA, ALPHA), and "
              "their labels alike (Zhang et al. 2018; 0.2-0.4 there); 0 = off (default: %(default)g)")


def check_args(args):
    """Impossible values are errors before any work starts."""
    rules = [(args.batch_size > 0, "--batch_size must be positive"),
             (args.eval_batch_size is None or args.eval_batch_size > 0,
              "--eval_batch_size must be positive"),
             (args.lr is None or args.lr > 0, "--lr must be positive"),
             (args.epoch_num > 0, "--epoch_num must be positive"),
             (args.patience > 0, "--patience must be at least 1"),
             (args.num_iter_to_validate >= 0, "--num_iter_to_validate must be 0 or more"),
             (args.num_epoch_to_validate > 0, "--num_epoch_to_validate must be positive"),
             (args.threads >= 0, "--threads must be 0 or more"),
             (args.num_save >= 0, "--num_save must be 0 or more"),
             (args.weight_decay >= 0, "--weight_decay must be 0 or more"),
             (0 <= args.label_smoothing < 1, "--label_smoothing must be in [0, 1)"),
             (0 <= args.erase_p <= 1, "--erase_p must be in [0, 1]"),
             (0 < args.erase_area[0] <= args.erase_area[1] <= 1, "--erase_area needs 0 < MIN <= MAX <= 1"),
             (args.erase_ratio >= 1, "--erase_ratio must be at least 1"),
             (args.mixup >= 0, "--mixup must be 0 or more"),
             (0 < args.scale[0] <= args.scale[1], "--scale needs 0 < MIN <= MAX"),
             (0 <= args.max_shift < 1, "--max_shift must be in [0, 1)"),
             (0 <= args.max_rotate <= 180, "--max_rotate must be in [0, 180]"),
             (0 <= args.momentum < 1, "--momentum must be in [0, 1)"),
             (args.ema_warmup >= 1, "--ema_warmup must be at least 1"),
             (0 <= args.ema_decay < 1, "--ema_decay must be in [0, 1)"),
             (0 <= args.kd_alpha <= 1, "--kd_alpha must be in [0, 1]"),
             (args.kd_temperature > 0, "--kd_temperature must be positive"),
             (args.hold_out is None or 0 <= args.hold_out[0] < args.hold_out[1],
              "--hold_out FOLD FOLDS needs 0 <= FOLD < FOLDS"),
             (args.hold_out is None or args.hold_out[1] >= 2, "--hold_out needs at least 2 FOLDS"),
             (args.warmup_epochs >= 0, "--warmup_epochs must be 0 or more"),
             (args.plateau_patience > 0, "--plateau_patience must be positive"),
             (0 < args.plateau_factor < 1, "--plateau_factor must be in (0, 1)")]
    errors = [message for ok, message in rules if not ok]
    if errors:
        raise UserError("; ".join(errors))


def typed_flags(parser, argv):
    """The destinations of the flags the user typed: whole names (the parser refuses
    abbreviations), `--name=value`, and short flags with their value joined (`-o/tmp/x`)."""
    typed = {token.split("=", 1)[0] if token.startswith("--") else token[:2]
             for token in argv if token.startswith("-")}
    return {action.dest for action in parser._actions if typed & set(action.option_strings)}


def check_not_behind(resume, path):
    """Resuming writes <model>_last.pth beside the file: from a _best.pth (an earlier step) that
    would throw the run's later steps away, so it is refused while the _last.pth is there."""
    last = os.path.join(os.path.dirname(os.path.abspath(path)), f"{resume['model_name']}_last.pth")
    if resume.get("kind") != "best" or not os.path.exists(last) or os.path.samefile(last, path):
        return
    raise UserError(f"{path} is the run's best checkpoint (step {resume['train_state'].step}); resuming "
                    f"from it would train those steps again and replace {last}. Resume the run with "
                    f"--checkpoint {last}, or start a new one from these weights: python3 run.py -m "
                    f"{resume['model_name']} --init_from {path}")


def resolve_run(parser, argv):
    """Parse the command line into (args, checkpoint to resume or None, checkpoint to start from
    or None). `-m MODEL --checkpoint FILE`, the old spelling of --init_from, is still understood."""
    args = parser.parse_args(argv)
    if args.run_name is not None and not plain_name(args.run_name):
        raise UserError(f"--run_name {args.run_name!r} is not a plain folder name (no folders, not "
                        "'.' or '..', not empty): a run's folders are made inside --checkpoint_dir and -o")
    if args.checkpoint and os.path.isdir(args.checkpoint):
        if glob.glob(os.path.join(args.checkpoint, "*_last.pth")):
            args.checkpoint = checkpoint.resolve(args.checkpoint, "last")  # a run folder: resume its run
        elif args.model is not None:  # the old meaning of -m M --checkpoint FOLDER
            print(f"note: {args.checkpoint} holds no run to resume; with -m it is taken as "
                  "--checkpoint_dir, the folder for the new run's folder")
            args.checkpoint_dir, args.checkpoint = args.checkpoint, None
        else:
            raise UserError(f"{args.checkpoint} holds no *_last.pth to resume; to start a run "
                            f"there pass -m MODEL --checkpoint_dir {args.checkpoint}")
    if args.checkpoint and args.model is not None and args.init_from is None:
        print("note: -m with --checkpoint FILE starts a new run from the file's weights "
              "(--init_from); to resume the run instead, leave out -m")
        args.init_from, args.checkpoint = args.checkpoint, None  # the old spelling of --init_from
    if args.checkpoint and args.init_from:
        raise UserError("--checkpoint resumes a run and --init_from starts a new one: pass one")
    resume = init = None
    if args.checkpoint:
        resume = checkpoint.load(args.checkpoint)
        resume["train_state"] = checkpoint.train_state(resume, args.checkpoint)
        check_not_behind(resume, args.checkpoint)
        saved = {**vars(parser.parse_args([])), **resume["args"]}  # flags added since: defaults
        typed = typed_flags(parser, argv)
        ignored = sorted(typed - set(RESUME_OVERRIDES) - {"checkpoint"})
        if ignored:
            print(f"note: resuming keeps the run's own settings; ignoring --{', --'.join(ignored)}")
        if "epoch_num" in typed and args.epoch_num != saved["epoch_num"]:
            print(f"note: --epoch_num {args.epoch_num} (the run was planned for {saved['epoch_num']})"
                  + (": the cosine schedule is stretched or shrunk to the new length from here on, "
                     "so the learning rate jumps" if saved["scheduler"] == "cosine" else ""))
        saved.update({k: getattr(args, k) for k in typed & set(RESUME_OVERRIDES)})
        saved["output"] = args.output  # this command's -o or its default, never the file's
        args = argparse.Namespace(**dict(saved, checkpoint=args.checkpoint, init_from=None))
    elif args.dataset == "synthetic":
        adapted = {k: v for k, v in SYNTHETIC_DEFAULTS.items() if k not in typed_flags(parser, argv)}
        vars(args).update(adapted)
        if adapted:
            print("note: defaults for the synthetic faces: " +
                  ", ".join(f"--{k} {v:g}" for k, v in adapted.items()))
    if args.init_from:
        init = checkpoint.load(args.init_from)
        args.model = args.model or init["model_name"]
        if init["model_name"] != args.model:
            raise UserError(f"{args.init_from} holds a {init['model_name']}, not a {args.model}")
    args.model = args.model or DEFAULT_MODEL
    check_args(args)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    return args, resume, init


def load_teachers(args, device):
    """The --teacher models, loaded once, in eval mode without gradients, on `device`. A new run
    records each file's sha256 in args (so in args.json and every checkpoint); a resumed run must
    find the same files, at the saved paths or at the ones --teacher names now."""
    if not args.teacher:
        return []
    paths = [os.path.abspath(p) for p in args.teacher]
    saved = getattr(args, "teacher_sha256", None)  # set when resuming a distillation run
    if saved is not None and len(saved) != len(paths):
        raise UserError(f"this run was distilled from {len(saved)} teacher(s) and --teacher names "
                        f"{len(paths)}: pass the run's teachers (sha256 {', '.join(h[:12] for h in saved)})")
    teachers, digests = [], []
    for i, path in enumerate(paths):
        if saved is not None and not os.path.isfile(path):
            raise UserError(f"teacher {path} of this run is missing: put it back, or name where it is "
                            f"now with --teacher (the run needs the file with sha256 {saved[i][:12]}...)")
        ckpt = checkpoint.load(path)  # a missing, broken or foreign file is a UserError naming it
        digests.append(file_sha256(path))
        if saved is not None and digests[-1] != saved[i]:
            raise UserError(f"teacher {path} has changed since the run started (sha256 "
                            f"{digests[-1][:12]}..., the run's was {saved[i][:12]}...): resuming "
                            "with other teachers would not continue the same run")
        model = checkpoint.build_model(ckpt, device, source=path).requires_grad_(False)
        # Which faces it never saw (--hold_out): kept in its args, exports included.
        model.hold_out = ckpt.get("args", {}).get("hold_out")
        model.hold_out_sha256 = ckpt.get("args", {}).get("hold_out_sha256")
        teachers.append(model.to(memory_format=torch.channels_last) if args.channels_last else model)
    args.teacher, args.teacher_sha256 = paths, digests
    return teachers


def hold_out(splits, args, class_names, log):
    """--hold_out FOLD FOLDS: drop that fold from the training split (dataset.fold_of), and note
    the split's fingerprint in args for the students of this run. Returns the kept faces'
    positions in the whole training split, or None when every face is kept."""
    if not args.hold_out:
        return None
    fold, folds = args.hold_out
    images, labels = splits["train"]
    keep = np.flatnonzero(dataset.fold_of(len(labels), folds) != fold)
    lost = sorted(set(labels.tolist()) - set(labels[keep].tolist()))
    if lost:
        raise UserError(f"--hold_out {fold} {folds} leaves no training face of the class(es) "
                        f"{', '.join(class_names[c] for c in lost)}: use fewer folds, or more faces")
    args.hold_out_sha256 = dataset.folds_sha256(images, labels, folds)
    splits["train"] = images[keep], labels[keep]
    log(f"holding out fold {fold} of {folds}: training on {len(keep)} of the {len(labels)} training faces")
    return keep


def teacher_weights(teachers, paths, train_split, keep):
    """(training faces, teachers) float weights of each face's soft target, rows summing to 1: a
    teacher trained with --hold_out labels only the faces of its held-out fold, any other teacher
    every face. None when no teacher held out a fold (the plain average). `train_split`: the
    whole training split (images, labels); `keep`: the faces this run trains on (its own
    --hold_out), None for all."""
    if not any(t.hold_out for t in teachers):
        return None
    images, labels = train_split
    labels_face, fingerprints = [], {}
    for path, teacher in zip(paths, teachers):
        if not teacher.hold_out:
            labels_face.append(np.ones(len(labels), bool))
            continue
        fold, folds = teacher.hold_out
        if folds not in fingerprints:
            fingerprints[folds] = dataset.folds_sha256(images, labels, folds)
        if teacher.hold_out_sha256 != fingerprints[folds]:
            raise UserError(f"teacher {path} held out fold {fold} of {folds} of other training faces "
                            "(other data, another order, or another numpy's shuffle): which faces it "
                            "never saw is known only on the data it was trained on; distil on that -d")
        labels_face.append(dataset.fold_of(len(labels), folds) == fold)
    labels_face = np.stack(labels_face, 1)
    if keep is not None:
        labels_face = labels_face[keep]
    orphans = int((~labels_face.any(1)).sum())
    if orphans:
        raise UserError(f"{orphans} of the {len(labels_face)} training faces have no teacher: a teacher "
                        "trained with --hold_out FOLD FOLDS labels only that fold, so together the "
                        "teachers must hold out every fold (e.g. --hold_out 0 2 and --hold_out 1 2)")
    return torch.from_numpy(labels_face / labels_face.sum(1, keepdims=True)).float()


def make_optimizer(model, args):
    """The optimiser the flags ask for; weight decay on weights only (not on BN, PReLU, biases)."""
    params = [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": args.weight_decay},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, nesterov=True)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.lr)
    return torch.optim.Adadelta(params, lr=args.lr)


def training_parts(model, args, train_labels, device, teachers=(), world=1, teacher_weights=None):
    """train.Parts: `model` on `device` in the flags' memory format, and what trains it as the
    flags ask (optimiser, loss, weight average, fp16 loss scaler, autocast dtype). run.main and
    tools/bench.py both call this."""
    model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = autocast_dtype(args.amp, device)
    weights = train.class_weights(train_labels, len(model.class_names)).to(device) if args.wl else None
    return train.Parts(
        model, make_optimizer(model, args),
        torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=args.label_smoothing),
        ema=train.weight_average(model, args.ema_decay, args.ema_warmup) if args.ema_decay else None,
        scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,
        amp_dtype=amp_dtype, teachers=list(teachers), world=world,
        teacher_weights=None if teacher_weights is None else teacher_weights.to(device))


def setup_distributed(device_name):
    """(rank, world size, device); torchrun's environment turns on DistributedDataParallel."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = select_device(device_name)
    if world == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def resume_command(args, path):
    """The command that resumes the run from `path`: with the run's -o where it is not the default,
    since a resumed run writes its outputs under the resuming command's -o."""
    same = os.path.normpath(args.output) == os.path.normpath(DEFAULT_OUTPUT)
    return f"python3 run.py --checkpoint {path}" + ("" if same else f" -o {args.output}")


def claim_run_folder(ckpt_dir, resuming, args):
    """Own a run folder for this process (lock_file), refused while another process holds it; a
    new run never reuses the folder of an earlier one; temporary files that a killed save left
    behind are removed. Returns the open lock file (release() removes it)."""
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
        lock = lock_file(os.path.join(ckpt_dir, ".lock"))
    except OSError as err:
        raise UserError(f"cannot write to {ckpt_dir}: {err.strerror or err}") from err
    if not resuming and glob.glob(os.path.join(glob.escape(ckpt_dir), "*.pth")):
        release({"lock": [lock], "new": [], "ckpt": ckpt_dir})
        last = glob.glob(os.path.join(glob.escape(ckpt_dir), f"{args.model}_last.pth"))
        hint = (f"resume it with: {resume_command(args, last[0])}, or pick another --run_name" if last
                else "pick another --run_name")
        raise UserError(f"{ckpt_dir} already holds a run; {hint}")
    for stale in glob.glob(os.path.join(glob.escape(ckpt_dir), ".tmp-*")):
        os.remove(stale)  # we hold the lock: no live process is writing these
    return lock


def lock_file(path):
    """The file at `path`, open and exclusively locked (flock), with our pid written in it for
    others' messages; a UserError naming the owner while another process holds it. The kernel
    drops the lock when its process dies, however it dies (a killed run's folder is free again),
    and a run that has not yet written its pid is never taken for a dead one."""
    import fcntl
    while True:
        f = open(path, "a+")  # created if missing, never emptied here
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip()
            f.close()
            raise UserError(f"another run{f' (process {owner})' if owner.isdigit() else ''} is using "
                            f"{os.path.dirname(path)}; wait for it to end, or pick another --run_name") from None
        try:
            same = os.path.samestat(os.fstat(f.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            f.truncate(0)  # "a+" writes at the end: now the start
            f.write(f"{os.getpid()}\n")
            f.flush()
            return f
        f.close()  # its owner removed it (as it ended) between our open and our lock: again


def write_history(history, out_dir):
    save_json(history, os.path.join(out_dir, "history.json"))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(history[-1]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write(os.path.join(out_dir, "history.csv"), lambda f: f.write(text.getvalue().encode()))


def plot_curves(history, path):
    """Loss and accuracy, train vs validation, against epochs (matplotlib's object API)."""
    from matplotlib.figure import Figure
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "acc")):
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{metric}"] for h in history], "o-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if metric == "acc" else "cross-entropy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def draw_or_warn(plot, *args):
    """Draw a chart (its path last in args); the run does not need the picture, so a failure is
    a warning."""
    try:
        plot(*args)
    except Exception as err:  # a missing font, a full disk: not worth stopping the run
        print(f"warning: could not draw {args[-1]}: {type(err).__name__}: {err}", file=sys.stderr)


def class_counts(data):
    """{split: faces per class} as plain lists: saved in checkpoints, compared on resume."""
    return {name: counts.tolist() for name, counts in dataset.class_counts(data).items()}


@dataclass
class Run:
    """One training run as main() drives it: built by prepare(), its state saved by save()."""
    args: argparse.Namespace
    data: object  # dataset.FerData: a CSV's faces or a folder's
    splits: dict  # {"train"|"val"|"test": (images, labels)}
    parts: train.Parts
    state: checkpoint.TrainState
    batches: dataset.Batches
    val_batches: dataset.Batches
    paths: dict  # {"best"|"last": checkpoint path}
    out_dir: str
    used_imagenet: bool
    rank: int = 0
    log: object = print
    counts: dict = None  # faces per split and class, saved with every checkpoint
    session_steps: int = 0
    session_start: float = field(default_factory=time.perf_counter)


def main(argv):
    """Train to the next validation, validate, decide, save; then test the best on PrivateTest."""
    args, resume, init = resolve_run(get_args_parser(), argv)
    created = {"new": [], "lock": [], "ckpt": None}  # what this command created and holds (release)
    try:
        run = prepare(args, resume, init, created)
        if run is None:
            return 0
        announce(run, resume, init)
        steps_per_epoch = len(run.batches)
        total_steps = args.epoch_num * steps_per_epoch
        every = args.num_iter_to_validate or args.num_epoch_to_validate * steps_per_epoch
        state, ended = run.state, "finished all epochs"
        with train.StopRequest() as stop:
            while state.step < total_steps:
                if state.bad_validations >= args.patience:
                    ended = f"early stopping after {args.patience} validations without improvement"
                    break
                start_step, started = state.step, time.perf_counter()
                until = min(total_steps, (state.step // every + 1) * every)
                train_loss, train_acc, _, stopped = train.train_steps(
                    run.parts, run.batches, state, args, until, stop, show_progress=run.rank == 0)
                run.session_steps += state.step - start_step
                if stopped and state.step < until:
                    state.elapsed += time.perf_counter() - started
                    save(run, "last")
                    ended = f"stopped by {stopped}"
                    break
                # (A stop in the step that ends at `until` still gets its validation: the resumed
                # run starts past it, so that validation would be lost.)
                if validate(run, train_loss, train_acc, started):
                    save(run, "best")
                save(run, "last")
                if stopped:
                    ended = f"stopped by {stopped}"
                    break
        return finish(run, ended, total_steps)
    except train.Diverged as err:
        kept = checkpoint.kept_note(os.path.dirname(run.paths["last"]))
        advice = ("Try a lower --lr" if not os.path.exists(run.paths["last"]) else
                  f"Start a new run with a lower --lr and another --run_name (resuming keeps this run's "
                  f"--lr), from scratch or from --init_from {run.paths['last']}")
        raise UserError(f"{err} and {kept}. {advice}.") from None
    finally:
        release(created)


def prepare(args, resume, init, created):
    """Everything a run needs: first its folders (the run name is checked and claimed before any
    download or slow work; `created` records what this command created, which main removes again
    if it stays empty), then the data and the models. Returns the Run, or None when a resumed run
    has nothing left to do."""
    rank, world, device = setup_distributed(args.device)
    if resume is not None and resume.get("world_size", 1) != world:
        raise UserError(f"{args.checkpoint} was trained by {resume.get('world_size', 1)} process(es) and "
                        f"this is {world}: resume it with as many (torchrun --nproc_per_node N), since its "
                        "steps, batches and schedule are counted per process")
    ckpt_dir, out_dir = run_folders(args, resume, world)
    paths = {kind: os.path.join(ckpt_dir, f"{args.model}_{kind}.pth") for kind in ("best", "last")}
    if resume is not None and finished(args, resume, out_dir):
        return None
    created.update(new=missing_folders(ckpt_dir) + missing_folders(out_dir), ckpt=ckpt_dir)
    if rank == 0:
        created["lock"].append(claim_run_folder(ckpt_dir, resume is not None, args))
        check_outputs(out_dir, resume is not None)
        check_writable(out_dir)
    reuse_freed_memory(device)  # each step's large activations reuse memory, not fault it in again
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.threads:
        torch.set_num_threads(args.threads)
    teachers = load_teachers(args, device)
    data = dataset.load_data(args.dataset, args.skip_bad_rows, args.faces, log=log, training=True)
    # Each split once (a split copies its faces); a missing one fails now, not after training.
    splits = {name: data.split(name) for name in ("train", "val", "test")}
    check_data(data, args, resume, teachers)
    whole_train = splits["train"]  # before --hold_out
    keep = hold_out(splits, args, data.class_names, log)
    weights = teacher_weights(teachers, args.teacher, whole_train, keep)
    counts = class_counts(data)
    if resume is not None and resume.get("class_counts") not in (None, counts):
        raise UserError(f"{args.dataset} is not the data set this run was trained on (faces per split "
                        f"and class differ from those in {args.checkpoint}): resume with that file's -d")
    seed_everything(args.seed + rank)
    model, used_imagenet = initial_model(args, data, init, resume, log)
    parts = training_parts(model, args, splits["train"][1], device, teachers, world, weights)
    state = restore(parts, resume, rank, args.checkpoint) if resume is not None else checkpoint.TrainState()
    if args.amp and parts.amp_dtype is None:
        log(f"note: --amp needs CUDA or a CPU that computes bf16 natively (AVX512-BF16 or AMX); training in fp32 on {device.type}")
    parts.model = wrap_model(parts.model, args, device, world)
    batches = dataset.Batches(*splits["train"], args.batch_size, device, args.seed, rank=rank, world=world)
    val_batches = dataset.Batches(*splits["val"], eval_batch_size(args.eval_batch_size, device),
                                  device, shuffle=False, rank=rank, world=world)
    return Run(args, data, splits, parts, state, batches, val_batches, paths, out_dir,
               used_imagenet, rank, log, counts)


def initial_model(args, data, init, resume, log):
    """(model, whether it has ImageNet weights): the --init_from weights, with a head for the data's
    classes (a folder's may be others), or a new model (resuming loads its weights next)."""
    if init is None:
        return build_model(args.model, "no" if resume is not None else args.pretrained, data.class_names)
    model = checkpoint.build_model(init, source=args.init_from).train()
    new_head = fit_classes(model, data.class_names)
    if new_head:
        log(f"note: {new_head}")
    return model, init.get("pretrained_used", False)


def check_data(data, args, resume, teachers):
    """A resumed run must find the faces it started with (a folder's are named when they
    changed); teachers must have the data's classes, which are the student's. A folder's faces
    setting and fingerprint go into args, so into args.json and every checkpoint (a CSV's too)."""
    fingerprint = data.fingerprint if data.files is not None else dataset.csv_sha256(data)
    saved = getattr(args, "data_sha256", None)  # None: a run started before CSVs had one
    if resume is not None and data.files is not None:
        split_file = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), folders.SPLIT_FILE)
        changed = folders.changes(data, saved, split_file)
        if changed:
            raise UserError(f"{changed}; resume with the folder as it was when the run started "
                            "(or start a new run on it)")
    elif resume is not None and saved not in (None, fingerprint):
        raise UserError(f"{args.dataset} is not the data set this run was trained on (its faces, labels or "
                        f"splits differ from those in {args.checkpoint}, by their sha256): resume with that file's -d")
    for path, teacher in zip(args.teacher or [], teachers):
        if tuple(teacher.class_names) != tuple(data.class_names):
            raise UserError(f"teacher {path} has the classes {', '.join(teacher.class_names)}; the data's "
                            f"are {', '.join(data.class_names)}: a teacher must have the student's classes")
    args.data_sha256 = fingerprint
    if data.files is not None:
        args.faces = data.faces


def finished(args, resume, out_dir):
    """True (with a note on how to go on) when the resumed run has no epochs left or stopped
    early: resuming it again would only test it again."""
    state, counts = resume["train_state"], resume.get("class_counts") or {}
    trained = counts.get("Training", counts.get("train"))  # a CSV's split names, or a folder's
    if trained is None:
        return False
    faces = sum(trained)
    if args.hold_out:  # it trained on the faces outside its held-out fold
        faces = int((dataset.fold_of(faces, args.hold_out[1]) != args.hold_out[0]).sum())
    steps_per_epoch = math.ceil(faces / (args.batch_size * resume.get("world_size", 1)))
    if state.step >= args.epoch_num * steps_per_epoch:
        why, how = f"finished all its {args.epoch_num} epochs", "--epoch_num N (more than " + f"{args.epoch_num})"
    elif state.bad_validations >= args.patience:
        why, how = (f"stopped early after {args.patience} validations without improvement",
                    f"--patience N (more than {args.patience})")
    else:
        return False
    if not os.path.exists(os.path.join(out_dir, "test", "metrics.json")):  # its test was cut short
        print(f"note: {args.run_name} already {why}, but {out_dir} has no test report: testing its best "
              "checkpoint now")
        return False
    print(f"note: {args.run_name} already {why}; its test report is in "
          f"{os.path.join(out_dir, 'test')} (or the folder of the command that finished it). "
          f"To train it further: {resume_command(args, args.checkpoint)} {how}")
    return True


def check_outputs(out_dir, resuming):
    """A new run never writes over another run's outputs: the same --run_name and -o with another
    --checkpoint_dir would replace its arguments, history and test results. A resumed run writes on."""
    found = [f for f in ("args.json", "history.json") if os.path.exists(os.path.join(out_dir, f))]
    if found and not resuming:
        raise UserError(f"{out_dir} already holds the outputs of another run ({', '.join(found)}); "
                        "pick another --run_name or -o")


def missing_folders(path):
    """`path` and those of its parent folders that do not exist yet, deepest first."""
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def release(created):
    """Give back what prepare() took: the run folder's lock, and the folders it made when the run
    saved no checkpoint (a run that fails before its first save leaves none: not its args.json,
    nor a folder's split.csv and left_out.csv, which would refuse the same command again)."""
    for lock in created["lock"]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock.name)  # while still holding it: see claim_run_folder
        lock.close()
    saved = created["ckpt"] and glob.glob(os.path.join(glob.escape(created["ckpt"]), "*.pth"))
    for folder in created["new"]:
        if not saved and os.path.isdir(folder) and set(os.listdir(folder)) <= set(START_FILES):
            for name in os.listdir(folder):
                os.remove(os.path.join(folder, name))
        if os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)


def restore(parts, resume, rank, path):
    """Load a resumed run's weights, optimiser, scaler, average and RNG from the checkpoint at
    `path`; returns its TrainState. Parts that do not fit are a one-line UserError naming it."""
    try:
        checkpoint.load_weights(parts.model, resume["model_state"], path)  # UserErrors of its own
        if parts.ema is not None and resume.get("ema_state") is not None:
            checkpoint.load_weights(parts.ema.module, resume["ema_state"], path)
            parts.ema.n_averaged.fill_(resume["ema_updates"])
        parts.optimizer.load_state_dict(resume["optimizer_state"])
        if parts.scaler is not None and resume.get("scaler_state"):
            parts.scaler.load_state_dict(resume["scaler_state"])
        rng = resume["rng"]
        train.set_rng_state(rng[rank] if rank < len(rng) else rng[0])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"{path}: its optimiser, loss scaler or random-number state does not fit "
                        f"this run ({first}); the file is damaged or was edited") from err
    return resume["train_state"]


def plain_name(name):
    """Whether `name` names a folder directly inside another: no separators, not '', '.', '..'."""
    return (isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name
            and not (os.altsep and os.altsep in name))


def run_folders(args, resume, world):
    """(checkpoint folder, output folder): beside the resumed file, or checkpoint_dir/RUN; the
    outputs always under this command's -o. Sets args.run_name."""
    if resume is not None:
        run_name = resume["run_name"]
        if not plain_name(run_name):
            raise UserError(f"{args.checkpoint} names its run {clip(run_name, 100)!r}, which is not a "
                            "plain folder name; refused (a checkpoint never chooses where a run writes)")
        ckpt_dir = os.path.dirname(os.path.abspath(args.checkpoint))
    else:
        run_name = args.run_name or f"{args.model}_{time.strftime('%Y%m%d-%H%M%S')}"
        if world > 1:  # every rank must agree on the name rank 0 chose
            names = [run_name]
            torch.distributed.broadcast_object_list(names, src=0)
            run_name = names[0]
        ckpt_dir = os.path.join(args.checkpoint_dir, run_name)
    args.run_name = run_name
    return ckpt_dir, os.path.join(args.output, run_name)


def wrap_model(model, args, device, world):
    """The module the steps train: under torchrun in DistributedDataParallel (synchronised
    BatchNorm with --sync_bn), compiled with --compile."""
    if world > 1:
        if args.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if args.compile else model


def save(run, kind):
    """Write the best or last checkpoint (rank 0; every rank's RNG state goes into it)."""
    rng = [train.rng_state()]
    if run.parts.world > 1:
        rng = [None] * run.parts.world
        torch.distributed.all_gather_object(rng, train.rng_state())
    if run.rank == 0:
        parts, args = run.parts, run.args
        checkpoint.save(checkpoint.training_checkpoint(
            kind, args, train.unwrap(parts.model), parts.optimizer, run.state, rng, scaler=parts.scaler,
            ema=parts.ema, pretrained_used=run.used_imagenet, dataset=run.data.source,
            class_counts=run.counts, world_size=parts.world), run.paths[kind])


def validate(run, train_loss, train_acc, started):
    """Validate (the weight average when there is one), record the result in the history and
    print one line; True when it is a new best."""
    args, state, parts = run.args, run.state, run.parts
    model = train.unwrap(parts.model)
    if parts.world > 1:
        # BatchNorm statistics drift apart on each rank's own batches; validate (and save) with
        # rank 0's, which DDP hands to every rank before each forward anyway.
        for buffer in [*model.buffers(), *(parts.ema.module.buffers() if parts.ema else [])]:
            torch.distributed.broadcast(buffer, 0)
    with predict.autocast(run.val_batches.device, parts.amp_dtype):  # bf16: 1.7x faster, same accuracy to 0.1%
        raw = train.evaluate(model, run.val_batches, parts.world)
        val_loss, val_acc = raw if parts.ema is None else train.evaluate(parts.ema.module, run.val_batches, parts.world)
    train.check_finite(val_loss, state.step, parts.optimizer.param_groups[0]["lr"])
    improved = state.record(val_loss if args.early_stop == "loss" else val_acc, args.early_stop)
    if args.scheduler == "plateau" and not improved and state.bad_validations % args.plateau_patience == 0:
        state.lr_factor *= args.plateau_factor
    state.elapsed += time.perf_counter() - started
    steps_per_epoch = len(run.batches)
    state.history.append({
        "step": state.step, "epoch": round(state.step / steps_per_epoch, 4),
        "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
        "lr": parts.optimizer.param_groups[0]["lr"], "time": round(state.elapsed, 2),
        **({"val_loss_raw": raw[0], "val_acc_raw": raw[1]} if parts.ema is not None else {})})
    per_epoch = (time.perf_counter() - run.session_start) / run.session_steps * steps_per_epoch
    eta = per_epoch * (args.epoch_num * steps_per_epoch - state.step) / steps_per_epoch
    run.log(f"epoch {state.step / steps_per_epoch:.2f}/{args.epoch_num}: train loss {train_loss:.4f}"
            f" acc {train_acc:.4f} | val loss {val_loss:.4f} acc {val_acc:.4f}"
            + (f" (raw weights {raw[1]:.4f})" if parts.ema is not None else "") +
            f" | best {args.early_stop} {state.best_score:.4f}{' (new)' if improved else ''}"
            f" | patience left {args.patience - state.bad_validations}"
            f" | {per_epoch:.0f} s/epoch, {eta / 60:.0f} min to go")
    return improved


def announce(run, resume, init):
    """What the run is about to do (rank 0), and its arguments in args.json."""
    if run.rank != 0:
        return
    args, parts, log = run.args, run.parts, run.log
    log(f"{run.data.source}: {len(run.splits['train'][1])} training, {len(run.val_batches.labels)} validation faces")
    log(dataset.class_table(dataset.class_counts(run.data), run.data.class_names))
    if args.wl:
        log("class weights (inverse frequency, mean 1): " + ", ".join(
            f"{name} {w:.3f}" for name, w in zip(run.data.class_names, parts.loss_fn.weight.tolist())))
    if init is not None:
        log(f"starting from the weights of {args.init_from} (fine-tuning)")
    if parts.teachers:
        log(f"distilling from {len(parts.teachers)} teacher(s) (alpha {args.kd_alpha:g}, temperature "
            f"{args.kd_temperature:g}): " + ", ".join(
                f"{os.path.basename(p)} (sha256 {h[:12]}"
                + (f", held out fold {t.hold_out[0]} of {t.hold_out[1]}, labels only those faces)" if t.hold_out else ")")
                for p, h, t in zip(args.teacher, args.teacher_sha256, parts.teachers)))
    if resume is not None:
        log(f"resuming {args.run_name} from {args.checkpoint} at step {run.state.step} "
            f"(epoch {run.state.step / len(run.batches):.2f})")
        best = run.paths["best"]
        if os.path.exists(best) and os.path.getmtime(best) > os.path.getmtime(args.checkpoint):
            log(f"note: {best} is newer than {args.checkpoint} (a save was cut short); "
                f"continuing from {args.checkpoint}")
    save_json(vars(args), os.path.join(run.out_dir, "args.json"))
    for folder in (run.out_dir, os.path.dirname(run.paths["last"])):  # a folder's split, beside the run
        folders.write_split(run.data, folder)
    world, amp = parts.world, parts.amp_dtype
    log(f"{args.model} on {run.batches.device.type}" + (f" x{world} processes" if world > 1 else "") +
        f": {len(run.batches)} steps per epoch, "
        f"{str(amp).split('.')[-1] + ' autocast' if amp else 'fp32'}, ImageNet prefix: {'yes' if run.used_imagenet else 'no'}"
        f", weight average: {'decay ' + str(args.ema_decay) if parts.ema is not None else 'off'}"
        f"{f', mixup alpha {args.mixup:g}' if args.mixup else ''}; "
        f"checkpoints in {os.path.dirname(run.paths['last'])}, outputs in {run.out_dir}")


def weights_agree(model, world):
    """Whether every rank ends with the same parameters, as DistributedDataParallel should keep
    them (BatchNorm's running statistics are left out: each rank updates them on its own batches
    until the next forward pass broadcasts rank 0's): their float64 sums, gathered."""
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    sums = [torch.zeros_like(total) for _ in range(world)]
    torch.distributed.all_gather(sums, total)
    return all(torch.equal(s, total) for s in sums)


def finish(run, ended, total_steps):
    """After the loop: the closing line, history and charts, and the PrivateTest of the best
    checkpoint. Returns the exit code (130 when stopped by a signal)."""
    args, state, log = run.args, run.state, run.log
    seconds = time.perf_counter() - run.session_start
    log(f"{ended}; step {state.step} of {total_steps}, {state.elapsed:.0f} s in all, "
        f"{run.session_steps * args.batch_size * run.parts.world / max(seconds, 1e-9):.0f} training images/s "
        "in this session")
    if run.parts.world > 1:  # all ranks leave together: a rank gone early can abort the others' gloo
        agree = weights_agree(train.unwrap(run.parts.model), run.parts.world)
        log(f"weights identical on all {run.parts.world} ranks" if agree else
            "warning: the ranks' weights differ (a broken DistributedDataParallel setup): only rank 0's are saved")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    stopped = ended.startswith("stopped by")
    if run.rank != 0:
        return 130 if stopped else 0
    if state.history:
        write_history(state.history, run.out_dir)
        draw_or_warn(plot_curves, state.history, os.path.join(run.out_dir, "curves.png"))
    draw_or_warn(functools.partial(dataset.plot_class_distribution, class_names=run.data.class_names),
                 dataset.class_counts(run.data), os.path.join(run.out_dir, "class_distribution.png"))
    if stopped:
        log(f"resume with: {resume_command(args, run.paths['last'])}")
        return 130
    if os.path.exists(run.paths["best"]):
        device = run.batches.device
        test_name = "test (PrivateTest)" if run.data.files is None else "test"  # a folder's own split
        log(f"testing the best checkpoint on the {test_name} split")
        report.report(predict.load_models(run.paths["best"], device), *run.splits["test"],
                      os.path.join(run.out_dir, "test"), num_save=args.num_save,
                      batch_size=args.eval_batch_size, device=device, split_name=test_name, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
