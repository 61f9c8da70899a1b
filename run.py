"""Train one of the five models on FER2013 (or a folder of face images), select on PublicTest,
then test on PrivateTest (a folder's val and test splits).

This file is the one place that decides when to validate, stop and save (train.py holds the
steps, checkpoint.py the files): torchvision's classification reference drives its
train_one_epoch the same way.
"""
import argparse
import csv
import functools
import glob
import io
import os
import sys
import time

import torch

import checkpoint
import dataset
import folders
import infer
import train
from models import MODEL_NAMES, build_model, fit_classes
from utils import (DEFAULT_CSV, Parser, UserError, atomic_write, autocast_dtype, clip, check_writable, device_flags, flag,
                   eval_batch_size, file_sha256, one_of, reuse_freed_memory, run_cli, save_figure, save_json,
                   seed_everything, select_device)

DEFAULT_MODEL = "vgg2_4_2_conv3"
# Learning rates that work with the default batch size (128), per optimiser.
DEFAULT_LR = {"sgd": 0.02, "adamw": 1e-3, "adadelta": 0.1}
# The built-in synthetic faces (`-d synthetic`, 4,000 training faces) learn in a few epochs;
# random erasing hides the mouth, which carries most of their drawn expression.
SYNTHETIC_DEFAULTS = {"epoch_num": 6, "erase_p": 0.0}  # conv3: 92.8% on its test split
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
    flag(g, "-d", "--dataset", default=DEFAULT_CSV,
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

    g = p.add_argument_group("optimisation")
    flag(g, "--optimizer", choices=sorted(DEFAULT_LR), default="sgd",
         help="sgd = SGD with Nesterov momentum 0.9; adadelta is the classic recipe (default: sgd)")
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
    flag(g, "--teacher", nargs="+", default=None, metavar="FILE",
         help="distil from these trained models (checkpoints or exports, .pth): the student also "
              "learns their averaged softened probabilities on the same augmented faces")
    # Defaults from Hinton et al. 2015 as used by the CRD benchmark's KD baseline (Tian et al.,
    # ICLR 2020: T = 4, alpha = 0.9).
    flag(g, "--kd_alpha", type=float, default=0.9,
         help="weight of the teachers' soft targets; 1 - alpha goes to the labels (default: %(default)s)")
    flag(g, "--kd_temperature", type=float, default=4.0,
         help="softmax temperature of the soft targets (default: %(default)s)")

    g = p.add_argument_group("augmentation")
    flag(g, "--erase_p", type=float, default=0.5, help="probability of random erasing (default: 0.5)")

    g = p.add_argument_group("checkpoints and outputs")
    flag(g, "--checkpoint", default=None, metavar="FILE",
         help="resume this run (a *_last.pth file, or the run's folder)")
    flag(g, "--init_from", default=None, metavar="FILE",
         help="start a new run (-m) from the weights in this checkpoint or export (fine-tuning)")
    flag(g, "--checkpoint_dir", default="./checkpoint",
         help="folder for the run folders of checkpoints (default: %(default)s)")
    flag(g, "-o", "--output", default="./outputs", help="folder for outputs (default: %(default)s)")
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
             (0 <= args.ema_decay < 1, "--ema_decay must be in [0, 1)"),
             (0 <= args.kd_alpha <= 1, "--kd_alpha must be in [0, 1]"),
             (args.kd_temperature > 0, "--kd_temperature must be positive"),
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


def resolve_run(parser, argv):
    """Parse the command line into (args, checkpoint to resume or None, checkpoint to start from
    or None). `-m MODEL --checkpoint FILE`, the old spelling of --init_from, is still understood."""
    args = parser.parse_args(argv)
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
        saved = {**vars(parser.parse_args([])), **resume["args"]}  # flags added since: defaults
        saved.pop("num_workers", None)  # the old name of --threads
        if "ema_decay" not in resume["args"]:
            saved["ema_decay"] = 0.0  # runs started before --ema_decay existed had none
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
        teachers.append(model.to(memory_format=torch.channels_last) if args.channels_last else model)
    args.teacher, args.teacher_sha256 = paths, digests
    return teachers


def make_optimizer(model, args):
    """The optimiser the flags ask for; weight decay on weights only (not on BN, PReLU, biases)."""
    params = [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": args.weight_decay},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.lr)
    return torch.optim.Adadelta(params, lr=args.lr)


def training_parts(model, args, train_labels, device):
    """`model` on `device` in the flags' memory format, and what trains it as the flags ask:
    (model, optimizer, loss_fn, weight average or None, fp16 loss scaler or None, autocast dtype
    or None). run.main and tools/bench.py both call this."""
    model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, args)
    amp_dtype = autocast_dtype(args.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    weights = train.class_weights(train_labels, len(model.class_names)).to(device) if args.wl else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=args.label_smoothing)
    ema = train.weight_average(model, args.ema_decay) if args.ema_decay else None
    return model, optimizer, loss_fn, ema, scaler, amp_dtype


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


def claim_run_folder(ckpt_dir, resuming, model_name):
    """Own a run folder for this process: a lock file with our pid, refused while a live process
    holds it; a new run never reuses the folder of an earlier one; temporary files that a killed
    save left behind are removed. Returns the lock file's path (removed at the end)."""
    os.makedirs(ckpt_dir, exist_ok=True)
    lock = os.path.join(ckpt_dir, ".lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            pid = int(open(lock).read().strip() or 0)
            if pid <= 0:
                raise ValueError("no process named")  # a lock whose write was cut short
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):  # a dead owner's lock: take it over
            os.remove(lock)
            return claim_run_folder(ckpt_dir, resuming, model_name)
        except PermissionError:
            pass  # alive, owned by someone else
        raise UserError(f"another run (process {pid}) is using {ckpt_dir}; wait for it to end, or "
                        "pick another --run_name") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    if not resuming and glob.glob(os.path.join(ckpt_dir, "*.pth")):
        os.remove(lock)
        last = glob.glob(os.path.join(ckpt_dir, f"{model_name}_last.pth"))
        hint = (f"resume it with: python3 run.py --checkpoint {last[0]}" if last
                else "pick another --run_name")
        raise UserError(f"{ckpt_dir} already holds a run; {hint} (or choose another --run_name)")
    for stale in glob.glob(os.path.join(ckpt_dir, ".tmp-*")):
        os.remove(stale)  # we hold the lock: no live process is writing these
    return lock


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


def main(argv):
    parser = get_args_parser()
    args, resume, init = resolve_run(parser, argv)
    rank, world, device = setup_distributed(args.device)
    if resume is not None and resume.get("world_size", 1) != world:
        raise UserError(f"{args.checkpoint} was trained by {resume.get('world_size', 1)} process(es) and "
                        f"this is {world}: resume it with as many (torchrun --nproc_per_node N), since its "
                        "steps, batches and schedule are counted per process")
    reuse_freed_memory(device)  # each step's large activations reuse memory, not fault it in again
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.threads:
        torch.set_num_threads(args.threads)

    # Inputs first: nothing is created on disk until the data and the models are in hand.
    teachers = load_teachers(args, device)
    data = dataset.load_data(args.dataset, args.skip_bad_rows, args.faces, log=log, training=True)
    # Each split once (a split copies its faces); a missing one fails now, not after training.
    splits = {name: data.split(name) for name in ("train", "val", "test")}
    train_y = splits["train"][1]
    check_data(data, args, resume, teachers)
    if resume is not None and resume.get("class_counts") not in (None, class_counts(data)):
        raise UserError(f"{args.dataset} is not the data set this run was trained on (faces per split "
                        f"and class differ from those in {args.checkpoint}): resume with that file's -d")
    seed_everything(args.seed + rank)
    model, used_imagenet = initial_model(args, data, init, resume, log)
    model, optimizer, loss_fn, ema, scaler, amp_dtype = training_parts(model, args, train_y, device)
    if args.amp and amp_dtype is None:
        log(f"note: --amp needs CUDA or a CPU with bf16 support; training in fp32 on {device.type}")

    state = train.TrainState()
    if resume is not None:
        state = resume["train_state"]
        model.load_state_dict(resume["model_state"])
        optimizer.load_state_dict(resume["optimizer_state"])
        if scaler is not None and resume.get("scaler_state"):
            scaler.load_state_dict(resume["scaler_state"])
        if ema is not None and resume.get("ema_state") is not None:
            ema.module.load_state_dict(resume["ema_state"])
            ema.n_averaged.fill_(resume["ema_updates"])
        rng = resume["rng"]
        train.set_rng_state(rng[rank] if rank < len(rng) else rng[0])

    # Where this run writes: checkpoints beside the resumed file, outputs under this command's -o.
    if resume is not None:
        run_name = resume["run_name"]
        if not isinstance(run_name, str) or run_name in ("", ".", "..") or os.path.basename(run_name) != run_name:
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
    out_dir = os.path.join(args.output, run_name)
    args.run_name = run_name
    paths = {kind: os.path.join(ckpt_dir, f"{args.model}_{kind}.pth") for kind in ("best", "last")}
    new_folders = [f for f in (ckpt_dir, out_dir) if not os.path.exists(f)]
    lock = claim_run_folder(ckpt_dir, resume is not None, args.model) if rank == 0 else None
    try:
        if rank == 0:
            check_writable(out_dir)
        return train_and_test(args, data, splits, model, optimizer, loss_fn, ema, scaler, state, paths,
                              out_dir, used_imagenet, resume, init, device, amp_dtype, rank, world, log,
                              teachers)
    finally:
        if lock is not None and os.path.exists(lock):
            os.remove(lock)
        for folder in new_folders:  # a run that failed before its first save leaves no folders
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)


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
    changed); teachers must have the data's classes. A folder's faces setting and fingerprint go
    into args, so into args.json and every checkpoint."""
    if resume is not None:
        split_file = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), folders.SPLIT_FILE)
        changed = folders.changes(data, getattr(args, "data_sha256", None), split_file)
        if changed:
            raise UserError(f"{changed}; resume with the folder as it was when the run started "
                            "(or start a new run on it)")
    for path, teacher in zip(args.teacher or [], teachers):
        if tuple(teacher.class_names) != tuple(data.class_names):
            raise UserError(f"teacher {path} has the classes {', '.join(teacher.class_names)}; the data's "
                            f"are {', '.join(data.class_names)}: a teacher must have the same classes")
    if data.files is not None:
        args.faces, args.data_sha256 = data.faces, data.fingerprint


def class_counts(data):
    """{split: faces per class} as plain lists: saved in checkpoints, compared on resume."""
    return {name: counts.tolist() for name, counts in dataset.class_counts(data).items()}


def train_and_test(args, data, splits, model, optimizer, loss_fn, ema, scaler, state, paths, out_dir,
                   used_imagenet, resume, init, device, amp_dtype, rank, world, log, teachers):
    """The loop: train to the next validation, validate, decide, save; then the PrivateTest."""
    train_x, train_y = splits["train"]
    batches = dataset.Batches(train_x, train_y, args.batch_size, device, args.seed, rank=rank, world=world)
    val_batches = dataset.Batches(*splits["val"], eval_batch_size(args.eval_batch_size, device),
                                  device, shuffle=False, rank=rank, world=world)
    plain_model = model
    if world > 1:
        if args.sync_bn:
            model = plain_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    steps_per_epoch = len(batches)
    total_steps = args.epoch_num * steps_per_epoch
    every = args.num_iter_to_validate or args.num_epoch_to_validate * steps_per_epoch
    cfg = argparse.Namespace(**vars(args), amp_dtype=amp_dtype, teachers=teachers)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    counts = class_counts(data)  # saved with every checkpoint, computed once

    def save(kind):
        rng = [train.rng_state()]
        if world > 1:
            rng = [None] * world
            torch.distributed.all_gather_object(rng, train.rng_state())
        if rank == 0:
            checkpoint.save(checkpoint.training_checkpoint(
                kind, args.model, plain_model, optimizer, state, args, args.run_name, rng,
                scaler=scaler, ema=ema, pretrained_used=used_imagenet, dataset=data.source,
                class_counts=counts, world_size=world), paths[kind])

    if rank == 0:
        log(f"{data.source}: {len(train_y)} training, {len(val_batches.labels)} validation faces")
        log(dataset.class_table(dataset.class_counts(data), data.class_names))
        if args.wl:
            log("class weights (inverse frequency, mean 1): " + ", ".join(
                f"{name} {w:.3f}" for name, w in zip(data.class_names, loss_fn.weight.tolist())))
        if init is not None:
            log(f"starting from the weights of {args.init_from} (fine-tuning)")
        if teachers:
            log(f"distilling from {len(teachers)} teacher(s) (alpha {args.kd_alpha:g}, temperature "
                f"{args.kd_temperature:g}): " + ", ".join(
                    f"{os.path.basename(p)} (sha256 {h[:12]})" for p, h in zip(args.teacher, args.teacher_sha256)))
        if resume is not None:
            log(f"resuming {args.run_name} from {args.checkpoint} at step {state.step} "
                f"(epoch {state.step / steps_per_epoch:.2f})")
            best = paths["best"]
            if os.path.exists(best) and os.path.getmtime(best) > os.path.getmtime(args.checkpoint):
                log(f"note: {best} is newer than {args.checkpoint} (a save was cut short); "
                    f"continuing from {args.checkpoint}")
        save_json(vars(args), os.path.join(out_dir, "args.json"))
        for folder in (out_dir, os.path.dirname(paths["last"])):  # a folder's split, beside the run
            folders.write_split(data, folder)
        log(f"{args.model} on {device.type}" + (f" x{world} processes" if world > 1 else "") +
            f": {steps_per_epoch} steps per epoch, "
            f"{str(amp_dtype).split('.')[-1] + ' autocast' if amp_dtype else 'fp32'}, ImageNet prefix: {'yes' if used_imagenet else 'no'}"
            f", weight average: {'decay ' + str(args.ema_decay) if ema is not None else 'off'}; "
            f"checkpoints in {os.path.dirname(paths['last'])}, outputs in {out_dir}")

    ended, session_start, session_steps = "finished all epochs", time.perf_counter(), 0
    with train.StopRequest() as stop:
        while state.step < total_steps:
            if state.bad_validations >= args.patience:
                ended = f"early stopping after {args.patience} validations without improvement"
                break
            start_step, started = state.step, time.perf_counter()
            until = min(total_steps, (state.step // every + 1) * every)
            train_loss, train_acc, _, stopped = train.train_steps(
                model, optimizer, loss_fn, batches, state, cfg, device, until, stop, ema, scaler,
                world, show_progress=rank == 0)
            session_steps += state.step - start_step
            if stopped and state.step < until:
                state.elapsed += time.perf_counter() - started
                save("last")
                ended = f"stopped by {stopped}"
                break
            # (A stop in the step that ends at `until` still gets its validation: the resumed run
            # starts past it, so that validation would be lost.)
            if world > 1:
                # BatchNorm statistics drift apart on each rank's own batches; validate (and save)
                # with rank 0's, which DDP hands to every rank before each forward anyway.
                for buffer in [*plain_model.buffers(), *(ema.module.buffers() if ema else [])]:
                    torch.distributed.broadcast(buffer, 0)
            with autocast:  # bf16 validation under --amp: 1.7x faster, same accuracy to 0.1%
                raw = train.evaluate(plain_model, val_batches, world)
                val_loss, val_acc = raw if ema is None else train.evaluate(ema.module, val_batches, world)
            train.check_finite(val_loss, state.step, optimizer.param_groups[0]["lr"])
            improved = state.record(val_loss if args.early_stop == "loss" else val_acc, args.early_stop)
            if (args.scheduler == "plateau" and not improved
                    and state.bad_validations % args.plateau_patience == 0):
                state.lr_factor *= args.plateau_factor
            state.elapsed += time.perf_counter() - started
            state.history.append({
                "step": state.step, "epoch": round(state.step / steps_per_epoch, 4),
                "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                "val_acc": val_acc, "lr": optimizer.param_groups[0]["lr"],
                "time": round(state.elapsed, 2),
                **({"val_loss_raw": raw[0], "val_acc_raw": raw[1]} if ema is not None else {})})
            per_epoch = (time.perf_counter() - session_start) / session_steps * steps_per_epoch
            eta = per_epoch * (total_steps - state.step) / steps_per_epoch
            log(f"epoch {state.step / steps_per_epoch:.2f}/{args.epoch_num}: train loss {train_loss:.4f}"
                f" acc {train_acc:.4f} | val loss {val_loss:.4f} acc {val_acc:.4f}"
                + (f" (raw weights {raw[1]:.4f})" if ema is not None else "") +
                f" | best {args.early_stop} {state.best_score:.4f}{' (new)' if improved else ''}"
                f" | patience left {args.patience - state.bad_validations}"
                f" | {per_epoch:.0f} s/epoch, {eta / 60:.0f} min to go")
            if improved:
                save("best")
            save("last")
            if stopped:
                ended = f"stopped by {stopped}"
                break

    if world > 1:
        # Every rank must hold the same weights after training: compare a checksum.
        checksum = torch.tensor([sum(p.detach().double().sum() for p in plain_model.parameters())],
                                device=device)
        sums = [torch.zeros_like(checksum) for _ in range(world)]
        torch.distributed.all_gather(sums, checksum)
        agree = all(torch.equal(s, sums[0]) for s in sums)
        log(f"weights checksum {checksum.item():.6f}: " + (f"identical on all {world} ranks" if agree
            else "DIFFERENT across ranks: " + ", ".join(f"{s.item():.6f}" for s in sums)))
        torch.distributed.destroy_process_group()
    seconds = time.perf_counter() - session_start
    log(f"{ended}; step {state.step} of {total_steps}, {state.elapsed:.0f} s in all, "
        f"{session_steps * args.batch_size * world / max(seconds, 1e-9):.0f} training images/s "
        "in this session")
    if rank != 0:
        return 130 if ended.startswith("stopped by") else 0
    if state.history:
        write_history(state.history, out_dir)
        draw_or_warn(plot_curves, state.history, os.path.join(out_dir, "curves.png"))
    draw_or_warn(functools.partial(dataset.plot_class_distribution, class_names=data.class_names),
                 dataset.class_counts(data), os.path.join(out_dir, "class_distribution.png"))
    if ended.startswith("stopped by"):
        log(f"resume with: python3 run.py --checkpoint {paths['last']}")
        return 130
    if os.path.exists(paths["best"]):
        test_name = "test (PrivateTest)" if data.files is None else "test"  # a folder's own split
        log(f"testing the best checkpoint on {test_name}: reports in {os.path.join(out_dir, 'test')}")
        infer.report([paths["best"]], *splits["test"], os.path.join(out_dir, "test"),
                     num_save=args.num_save, batch_size=args.eval_batch_size, device=device,
                     split_name=test_name, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
