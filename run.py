"""Train one of the five models on FER2013, select on PublicTest, then test on PrivateTest.

    python3 run.py -m vgg2_0_2 -d synthetic --epoch_num 8        # built-in data, ~1 min on a CPU
    python3 run.py -m vgg2_4_2_conv3 -d data/fer2013.csv         # the real thing
    python3 run.py --checkpoint checkpoint/RUN/vgg2_4_2_conv3_last.pth   # resume exactly
    torchrun --nproc_per_node 8 run.py -m vgg2_4_2_conv3               # several GPUs

Each run gets its own folders, checkpoint/RUN/ and outputs/RUN/ (RUN = model and start time).
"""
import argparse
import csv
import os
import sys
import time

from utils import UserError, run_cli

# Learning rates that work with the default batch size (128), per optimiser.
DEFAULT_LR = {"sgd": 0.02, "adamw": 1e-3, "adadelta": 0.1}
# Flags that may differ when a run is resumed on another machine without changing the result.
RESUME_OVERRIDES = ("device", "num_workers", "num_save", "eval_batch_size", "debug", "epoch_num",
                    "patience")


def get_args_parser():
    from models import MODEL_NAMES
    p = argparse.ArgumentParser(
        description="Train a VGG11-prefix facial-emotion model on FER2013, then test it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-d", "--dataset", default="./data/fer2013.csv",
                   help="FER2013 CSV (.csv/.gz/.xz/.zip), or 'synthetic' for the built-in faces")
    p.add_argument("-m", "--model", choices=MODEL_NAMES, default=None,
                   help="model to train (default vgg2_4_2_conv3; taken from the file on resume)")
    p.add_argument("--batch_size", type=int, default=128, help="training batch size per process")
    p.add_argument("--eval_batch_size", type=int, default=None,
                   help="batch size for validation and the final test (default 64 on a CPU, "
                        "512 on a GPU)")
    p.add_argument("--optimizer", choices=sorted(DEFAULT_LR), default="sgd",
                   help="sgd = SGD with Nesterov momentum 0.9; adadelta is the classic recipe")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: sgd 0.02, adamw 1e-3, adadelta 0.1)")
    p.add_argument("--scheduler", choices=("cosine", "plateau", "none"), default="cosine",
                   help="cosine: warm-up then cosine decay to 0 over epoch_num; plateau: multiply "
                        "the lr by --plateau_factor after --plateau_patience bad validations")
    p.add_argument("--warmup_epochs", type=float, default=1.0, help="linear warm-up (cosine only)")
    p.add_argument("--plateau_patience", type=int, default=3, help="bad validations per lr drop")
    p.add_argument("--plateau_factor", type=float, default=0.5, help="lr multiplier per drop")
    p.add_argument("--weight_decay", type=float, default=5e-4, help="L2 weight decay")
    p.add_argument("--label_smoothing", type=float, default=0.1, help="cross-entropy smoothing")
    p.add_argument("--wl", action="store_true",
                   help="weight the loss by inverse class frequency of the Training split")
    p.add_argument("--erase_p", type=float, default=0.5, help="probability of random erasing")
    p.add_argument("--ema_decay", type=float, default=0.999,
                   help="keep an exponential moving average of the weights (per step, this decay) "
                        "and validate, select and ship it; 0 turns it off")
    p.add_argument("--epoch_num", type=int, default=50, help="maximum number of epochs")
    p.add_argument("--patience", type=int, default=10,
                   help="stop after this many validations without improvement")
    p.add_argument("--early_stop", choices=("loss", "acc"), default="loss",
                   help="validation metric for early stopping and the best checkpoint")
    p.add_argument("--num_iter_to_validate", type=int, default=0,
                   help="validate every N training steps (0: use --num_epoch_to_validate)")
    p.add_argument("--num_epoch_to_validate", type=int, default=1, help="validate every N epochs")
    p.add_argument("--num_workers", type=int, default=0,
                   help="CPU threads for PyTorch (0: all cores); data needs no worker processes")
    p.add_argument("--checkpoint", default="./checkpoint/",
                   help="folder for checkpoints; or a checkpoint file: without -m resume it, "
                        "with -m start a new run (in ./checkpoint/) from its weights")
    p.add_argument("--num_save", type=int, default=16, help="test faces saved as images")
    p.add_argument("-o", "--output", default="./outputs", help="folder for outputs")
    p.add_argument("--run_name", default=None, help="name of the run folder (default MODEL_TIME)")
    p.add_argument("--seed", type=int, default=0, help="seed; CPU runs repeat exactly")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                   help="auto: CUDA, then Apple MPS, then CPU")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision: bf16 autocast on CUDA (fp16 on older GPUs) and on CPUs "
                        "with bf16 support (about 2x faster training there)")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory format (about 2.5x faster convolutions on CPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--pretrained", choices=("auto", "yes", "no"), default="auto",
                   help="ImageNet weights for the VGG11-BN prefix; auto uses them when cached "
                        "or downloadable")
    p.add_argument("--sync_bn", action="store_true", help="synchronised BatchNorm under torchrun")
    p.add_argument("--skip_bad_rows", "--skip-bad-rows", action="store_true",
                   help="drop malformed CSV rows (with a warning that counts them)")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
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
             (args.num_workers >= 0, "--num_workers must be 0 or more"),
             (args.num_save >= 0, "--num_save must be 0 or more"),
             (args.weight_decay >= 0, "--weight_decay must be 0 or more"),
             (0 <= args.label_smoothing < 1, "--label_smoothing must be in [0, 1)"),
             (0 <= args.erase_p <= 1, "--erase_p must be in [0, 1]"),
             (0 <= args.ema_decay < 1, "--ema_decay must be in [0, 1)"),
             (args.warmup_epochs >= 0, "--warmup_epochs must be 0 or more"),
             (args.plateau_patience > 0, "--plateau_patience must be positive"),
             (0 < args.plateau_factor < 1, "--plateau_factor must be in (0, 1)")]
    errors = [message for ok, message in rules if not ok]
    if errors:
        raise UserError("; ".join(errors))


def explicit_flags(parser, argv):
    """The destinations of the flags the user actually typed."""
    typed = {token.split("=", 1)[0] for token in argv if token.startswith("-")}
    return {action.dest for action in parser._actions if typed & set(action.option_strings)}


def resolve_run(parser, argv):
    """Parse the command line into (args, checkpoint to resume or None, checkpoint to start from)."""
    from train import load_checkpoint
    args = parser.parse_args(argv)
    resume = init = None
    if os.path.isfile(args.checkpoint) or args.checkpoint.endswith(".pth"):
        ckpt = load_checkpoint(args.checkpoint)
        if args.model is None:
            resume = ckpt
            saved = dict(ckpt["args"])
            saved.setdefault("ema_decay", 0.0)  # runs started before --ema_decay existed had none
            typed = explicit_flags(parser, argv)
            ignored = sorted(typed - set(RESUME_OVERRIDES) - {"checkpoint"})
            if ignored:
                print(f"note: resuming keeps the run's own settings; ignoring --{', --'.join(ignored)}")
            saved.update({k: getattr(args, k) for k in typed & set(RESUME_OVERRIDES)})
            args = argparse.Namespace(**dict(saved, checkpoint=args.checkpoint))
        else:
            init = ckpt
            if ckpt["model_name"] != args.model:
                raise UserError(f"{args.checkpoint} holds a {ckpt['model_name']}, not a {args.model}")
            args.init_from = args.checkpoint
            args.checkpoint = parser.get_default("checkpoint")
    args.model = args.model or "vgg2_4_2_conv3"
    args.lr = args.lr or DEFAULT_LR[args.optimizer]
    check_args(args)
    return args, resume, init


def make_optimizer(model, args):
    """The optimiser the flags ask for; weight decay on weights only (not on BN, PReLU, biases)."""
    import torch
    from train import NesterovSGD
    params = [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": args.weight_decay},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return NesterovSGD(params, lr=args.lr, momentum=0.9)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.lr)
    return torch.optim.Adadelta(params, lr=args.lr)


def setup_distributed(device_name):
    """(rank, world size, device); torchrun's environment turns on DistributedDataParallel."""
    import torch
    from utils import select_device
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


def write_history(history, out_dir):
    from utils import save_json
    save_json(history, os.path.join(out_dir, "history.json"))
    with open(os.path.join(out_dir, "history.csv"), "w", newline="") as f:
        if history:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)


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
    fig.savefig(path, dpi=100)


def draw_or_warn(plot, *args):
    """Draw a chart (its path last in args); the run does not need the picture, so a failure is a
    warning. Charts are drawn after training: importing matplotlib before the first step, even in
    a thread, made that step 0.45 s slower on the dev CPU, a fifth of the 2 s start budget."""
    try:
        plot(*args)
    except Exception as err:  # a missing font, a full disk: not worth stopping the run
        print(f"warning: could not draw {args[-1]}: {type(err).__name__}: {err}", file=sys.stderr)


def main(argv):
    import numpy as np
    import torch
    import dataset
    import infer
    import train
    from torch.optim.swa_utils import AveragedModel
    from models import build_model
    from utils import amp_dtype_for, check_writable, reuse_freed_memory, save_json, save_torch, seed_everything

    parser = get_args_parser()
    args, resume, init = resolve_run(parser, argv)
    rank, world, device = setup_distributed(args.device)
    reuse_freed_memory(device)  # each step's large activations reuse memory, not fault it in again
    log = print if rank == 0 else (lambda *a, **k: None)
    if args.num_workers:
        torch.set_num_threads(args.num_workers)

    # Where this run writes: the resumed run's own folders, or new ones.
    if resume is not None:
        run_name, out_dir = resume["run_name"], resume["out_dir"]
        ckpt_dir = os.path.dirname(os.path.abspath(args.checkpoint))
    else:
        run_name = args.run_name or f"{args.model}_{time.strftime('%Y%m%d-%H%M%S')}"
        if world > 1:  # every rank must agree on the name rank 0 chose
            names = [run_name]
            torch.distributed.broadcast_object_list(names, src=0)
            run_name = names[0]
        ckpt_dir, out_dir = os.path.join(args.checkpoint, run_name), os.path.join(args.output, run_name)
    args.run_name = run_name
    if rank == 0:
        check_writable(ckpt_dir)
        check_writable(out_dir)

    data = dataset.load_fer2013(args.dataset, args.skip_bad_rows, log=log)
    train_x, train_y = data.split("train")
    val_x, val_y = data.split("val")
    data.split("test")  # fail now, not after training, when the test split is missing
    if rank == 0:
        log(f"{data.source}: {len(train_y)} training, {len(val_y)} validation faces")
        counts = dataset.class_counts(data)
        log(dataset.class_table(counts))

    seed_everything(args.seed + rank)
    model, used_imagenet = (build_model(args.model, "no") if resume is not None
                            else build_model(args.model, args.pretrained))
    if init is not None:
        model = infer.model_from_checkpoint(init)
        used_imagenet = init.get("pretrained_used", False)
        log(f"starting from the weights of {args.init_from} (fine-tuning)")
    model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, args)
    amp_dtype = amp_dtype_for(device) if args.amp else None
    if args.amp and amp_dtype is None:
        log(f"note: --amp needs CUDA or a CPU with bf16 support; training in fp32 on {device.type}")
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    weights = train.class_weights(train_y).to(device) if args.wl else None
    if weights is not None:
        log("class weights (inverse frequency, mean 1): " + ", ".join(
            f"{name} {w:.3f}" for name, w in zip(dataset.EMOTIONS, weights.tolist())))
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=args.label_smoothing)

    state = {"step": 0, "stopper": train.EarlyStopper(args.patience, args.early_stop),
             "lr_factor": 1.0, "history": [], "elapsed": 0.0, "running": torch.zeros(3)}
    if resume is not None:
        model.load_state_dict(resume["model_state"])
        optimizer.load_state_dict(resume["optimizer_state"])
        if scaler is not None and resume.get("scaler_state"):
            scaler.load_state_dict(resume["scaler_state"])
        stop = resume["stopper"]
        state.update(step=resume["step"], lr_factor=resume["lr_factor"], history=list(resume["history"]),
                     elapsed=resume["elapsed"], running=resume["running"],
                     stopper=train.EarlyStopper(args.patience, stop["mode"], stop["best"], stop["bad"]))
        rng = resume["rng"]
        train.set_rng_state(rng[rank] if rank < len(rng) else rng[0])
        log(f"resuming {run_name} at step {state['step']} (epoch {resume['epoch']:.2f})")
    model_to_save = model  # saved unwrapped: no `module.` / `_orig_mod.` prefixes
    if world > 1:
        if args.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model_to_save = model
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    ema = None
    if args.ema_decay:
        ema = AveragedModel(model_to_save, multi_avg_fn=train.ema_update_fn(args.ema_decay),
                            use_buffers=True)
        if resume is not None and resume.get("ema_state") is not None:
            ema.module.load_state_dict(resume["ema_state"])
            ema.n_averaged.fill_(resume["ema_updates"])

    on_device = device.type == "cuda"  # the whole data set fits on any GPU: no copies per batch
    to_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    train_images = to_tensor(train_x).unsqueeze(1)
    train_labels = to_tensor(train_y)
    val_data = (to_tensor(val_x).unsqueeze(1), to_tensor(val_y))
    if on_device:
        train_images, train_labels = train_images.to(device), train_labels.to(device)
        val_data = tuple(t.to(device) for t in val_data)
    batches = train.Batches(train_images, train_labels, args.batch_size, args.seed, rank=rank, world=world)
    steps_per_epoch = len(batches)

    # An unset --eval_batch_size stays None (also in the checkpoint): train.evaluate and
    # infer.report pick the default of whatever device the run, or its resumption, is on.
    cfg = argparse.Namespace(**vars(args), amp_dtype=amp_dtype)
    paths = {kind: os.path.join(ckpt_dir, f"{args.model}_{kind}.pth") for kind in ("best", "last")}

    def save(kind):
        rng = [train.rng_state()]
        if world > 1:
            rng = [None] * world
            torch.distributed.all_gather_object(rng, train.rng_state())
        if rank != 0:
            return
        checkpoint = {
            "format_version": train.CHECKPOINT_FORMAT, "kind": kind, "model_name": args.model,
            "model_state": model_to_save.state_dict(), "optimizer_state": optimizer.state_dict(),
            "scaler_state": scaler.state_dict() if scaler is not None else None,
            # The averaged weights are the ones validated and shipped (infer.model_from_checkpoint).
            "ema_state": ema.module.state_dict() if ema is not None else None,
            "ema_updates": int(ema.n_averaged) if ema is not None else 0,
            "step": state["step"], "epoch": state["step"] / steps_per_epoch,
            "stopper": vars(state["stopper"]), "lr_factor": state["lr_factor"],
            "history": state["history"], "elapsed": state["elapsed"], "rng": rng,
            "running": state["running"].cpu(),
            "args": {k: v for k, v in vars(args).items()}, "run_name": run_name, "out_dir": out_dir,
            "pretrained_used": used_imagenet, "class_names": list(dataset.EMOTIONS),
            "dataset": data.source, "world_size": world}
        try:
            save_torch(checkpoint, paths[kind])
        except OSError as err:
            raise UserError(f"could not write {paths[kind]} ({err.strerror or err}); the previous "
                            f"checkpoints in {ckpt_dir} are intact") from err

    if rank == 0:
        save_json(vars(args), os.path.join(out_dir, "args.json"))
        log(f"{args.model} on {device.type}" + (f" x{world} processes" if world > 1 else "") +
            f": {steps_per_epoch} steps per epoch, ImageNet prefix: {'yes' if used_imagenet else 'no'};"
            f" checkpoints in {ckpt_dir}, outputs in {out_dir}")
    ended = train.fit(model, optimizer, loss_fn, batches, val_data, cfg, state, save, device,
                      scaler, rank, world, log, eval_model=model_to_save, ema=ema)
    log(f"{ended}; {state['step']} steps in {state['elapsed']:.0f} s, "
        f"{state['images_per_s']:.0f} training images/s")
    if rank == 0:
        draw_or_warn(dataset.plot_class_distribution, counts,
                     os.path.join(out_dir, "class_distribution.png"))
    if rank == 0 and state["history"]:
        write_history(state["history"], out_dir)
        draw_or_warn(plot_curves, state["history"], os.path.join(out_dir, "curves.png"))
    if world > 1:
        # Every rank must hold the same weights after training: compare a checksum.
        checksum = torch.tensor([sum(p.detach().double().sum() for p in model_to_save.parameters())],
                                device=device)
        sums = [torch.zeros_like(checksum) for _ in range(world)]
        torch.distributed.all_gather(sums, checksum)
        agree = all(torch.equal(s, sums[0]) for s in sums)
        log(f"weights checksum {checksum.item():.6f}: " + (f"identical on all {world} ranks" if agree
            else "DIFFERENT across ranks: " + ", ".join(f"{s.item():.6f}" for s in sums)))
        torch.distributed.destroy_process_group()
    if ended.startswith("stopped by"):
        log(f"resume with: python3 run.py --checkpoint {paths['last']}")
        return 130
    if rank == 0 and os.path.exists(paths["best"]):
        test_x, test_y = data.split("test")
        log(f"testing the best checkpoint on PrivateTest: reports in {os.path.join(out_dir, 'test')}")
        metrics = infer.report([paths["best"]], test_x, test_y, os.path.join(out_dir, "test"),
                               num_save=args.num_save, batch_size=args.eval_batch_size,
                               device=device, split_name="test (PrivateTest)", log=log)
        save_json(metrics, os.path.join(out_dir, "test_metrics.json"))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
