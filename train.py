"""The training loop: in-memory batches, batched augmentation, early stopping, exact resume.

Driven by run.py (`python3 run.py -m vgg2_4_2_conv3`); the pieces here are plain functions and
two small stateful helpers (the batch loader and the stopper), so tests can use them directly.

Resume is exact because everything random is either a pure function of (seed, epoch, batch)
(the shuffling and the augmentation) or saved in the checkpoint (the dropout RNG).
"""
import math
import os
import signal
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.sgd import sgd

from utils import UserError, eval_batch_size

CHECKPOINT_FORMAT = 1


class Batches:
    """Serves (uint8 images, labels) batches as index slices of a per-epoch permutation.

    The whole split lives in one uint8 tensor (on the GPU when training there): no per-sample
    work, no worker processes. Under DistributedDataParallel each rank takes a disjoint shard of
    every epoch's permutation, and all ranks get the same number of batches."""

    def __init__(self, images, labels, batch_size, seed=0, shuffle=True, rank=0, world=1):
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world = rank, world

    def __len__(self):
        return math.ceil(len(self.labels) / (self.batch_size * self.world))

    def epoch_indices(self, epoch):
        """This rank's indices for an epoch, split into len(self) batches."""
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        else:
            order = torch.arange(n)
        shard = order[self.rank::self.world]
        return torch.tensor_split(shard, len(self))

    def epoch(self, epoch, start=0):
        """Yield (batch index, images, labels) from batch `start` on (to resume mid-epoch)."""
        for i, idx in enumerate(self.epoch_indices(epoch)[start:], start):
            idx = idx.to(self.labels.device)
            yield i, self.images[idx], self.labels[idx]


class NesterovSGD:
    """torch.optim.SGD(groups, lr, momentum, nesterov=True) without torch.optim.Optimizer.

    The update is torch's own (torch.optim.sgd.sgd, the same foreach kernels) and state_dict()
    has torch.optim.SGD's layout, so checkpoints resume with either. The base class is what
    it leaves out: it imports torch._dynamo on first use, 1.1 s on the dev CPU, more than half
    of the 2 s in which a run should reach its first training step."""

    def __init__(self, param_groups, lr, momentum=0.9):
        defaults = {"lr": lr, "momentum": momentum, "dampening": 0.0, "weight_decay": 0.0,
                    "nesterov": True, "maximize": False}
        self.param_groups = [{**defaults, **group, "params": list(group["params"])}
                             for group in param_groups]
        self.state = {}  # parameter -> {"momentum_buffer": tensor}

    def zero_grad(self, set_to_none=True):
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            buffers = [self.state.get(p, {}).get("momentum_buffer") for p in params]
            sgd(params, [p.grad for p in params], buffers, weight_decay=group["weight_decay"],
                momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                nesterov=group["nesterov"], maximize=group["maximize"])
            for p, buffer in zip(params, buffers):  # sgd() fills in the buffers it creates
                self.state[p] = {"momentum_buffer": buffer}

    def state_dict(self):
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        groups = [dict(group, params=[index[p] for p in group["params"]]) for group in self.param_groups]
        return {"state": {index[p]: dict(s) for p, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict):
        saved = state_dict["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the saved optimiser state does not match the model's parameters")
        params = [p for g in self.param_groups for p in g["params"]]
        for group, saved_group in zip(self.param_groups, saved):
            group.update({k: v for k, v in saved_group.items() if k in group and k != "params"})
        self.state = {params[i]: {k: v.to(params[i]) for k, v in s.items()}
                      for i, s in state_dict["state"].items()}


def augment(images, generator, max_rotate=10.0, max_shift=0.1, scale=(0.9, 1.1), erase_p=0.5):
    """Batched augmentation of uint8 (N, 1, H, W) faces -> float [0, 1].

    One random affine map per face (rotation, scale, shift, horizontal flip) applied by a single
    grid_sample over the whole batch, then random erasing of one rectangle per face. The random
    numbers come from `generator` (on the CPU) so a run repeats exactly."""
    n, _, h, w = images.shape
    x = images.float().div_(255)
    rnd = torch.rand(n, 6, generator=generator).to(x.device)
    angle = (rnd[:, 0] * 2 - 1) * math.radians(max_rotate)
    zoom = scale[0] + rnd[:, 1] * (scale[1] - scale[0])
    flip = torch.where(rnd[:, 2] < 0.5, -1.0, 1.0)
    shift = (rnd[:, 3:5] * 2 - 1) * (2 * max_shift)  # grid units span 2 across the image
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if erase_p > 0:
        # One rectangle of 2-20% of the face per image, filled with grey noise, with prob erase_p.
        box = torch.rand(n, 5, generator=generator).to(x.device)
        area = (0.02 + box[:, 0] * 0.18) * h * w
        ratio = torch.exp((box[:, 1] * 2 - 1) * math.log(3))
        eh = (area * ratio).sqrt().clamp(max=h)
        ew = (area / ratio).sqrt().clamp(max=w)
        top = box[:, 2] * (h - eh)
        left = box[:, 3] * (w - ew)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + eh).view(-1, 1, 1)) &
                  (cols >= left.view(-1, 1, 1)) & (cols < (left + ew).view(-1, 1, 1)) &
                  (box[:, 4] < erase_p).view(-1, 1, 1))
        noise = torch.rand(x.shape, generator=generator).to(x.device)
        x = torch.where(inside.unsqueeze(1), noise, x)
    return x


def batch_generator(seed, epoch, batch):
    """The CPU generator for one batch's augmentation: a pure function of its position."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + batch)


def class_weights(labels, num_classes=7):
    """Inverse class frequency of `labels`, normalised to mean 1 (classes absent get weight 0)."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    return torch.tensor(weights / weights[counts > 0].mean(), dtype=torch.float32)


def lr_factor(step, total_steps, warmup_steps, kind):
    """Learning-rate multiplier as a pure function of the step (nanoGPT's get_lr)."""
    if kind in ("none", "plateau"):
        return 1.0
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * progress))


class EarlyStopper:
    """Counts validations that do not improve the best score; stops after `patience` of them."""

    def __init__(self, patience, mode="loss", best=None, bad=0):
        self.patience, self.mode, self.best, self.bad = patience, mode, best, bad

    def update(self, score):
        """Record a validation score; True when it is a new best."""
        better = self.best is None or (score < self.best if self.mode == "loss" else score > self.best)
        if better:
            self.best, self.bad = score, 0
        else:
            self.bad += 1
        return better

    @property
    def should_stop(self):
        return self.bad >= self.patience


@torch.inference_mode()
def evaluate(model, images, labels, batch_size=None, device="cpu", rank=0, world=1):
    """Plain (unweighted) cross-entropy and accuracy on uint8 images, reduced over ranks."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    shard = torch.arange(len(labels))[rank::world]
    for idx in torch.split(shard, eval_batch_size(batch_size, device)):
        idx = idx.to(labels.device)
        x = images[idx].to(device, non_blocking=True).float().div_(255)
        y = labels[idx].to(device, non_blocking=True)
        logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    totals = torch.stack([loss_sum, correct, torch.tensor(float(len(shard)), device=device,
                                                          dtype=torch.float64)])
    if world > 1:
        torch.distributed.all_reduce(totals)
    return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()


def ema_update_fn(decay):
    """A multi_avg_fn for torch.optim.swa_utils.AveragedModel: an exponential moving average
    whose decay warms up as min(decay, (1 + n) / (10 + n)) after n updates (TensorFlow's
    ExponentialMovingAverage with num_updates). With a fixed 0.999 the average of a 150-step run
    would still be mostly its random initialisation."""
    def update(ema_tensors, tensors, num_averaged):
        n = float(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        if ema_tensors[0].is_floating_point():
            torch._foreach_lerp_(ema_tensors, tensors, 1 - d)
        else:  # BatchNorm's num_batches_tracked: keep the model's count
            torch._foreach_copy_(ema_tensors, tensors)
    return update


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path):
    """Load one of our checkpoints safely (tensors and plain values only: weights_only=True)."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint file at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or a pickle that wants to run code
        detail = (str(err).strip().splitlines() or ["empty or truncated file"])[0][:300]
        raise UserError(f"{path} is not a readable checkpoint of this tool "
                        f"({type(err).__name__}: {detail})") from err
    if not isinstance(ckpt, dict) or "model_state" not in ckpt or "model_name" not in ckpt:
        raise UserError(f"{path} is a PyTorch file but not a checkpoint of this tool")
    version = ckpt.get("format_version")
    if version != CHECKPOINT_FORMAT:
        raise UserError(f"{path} has checkpoint format {version}; this version of the tool reads "
                        f"format {CHECKPOINT_FORMAT}" + (" (it was written by a newer version; "
                        "update the tool)" if isinstance(version, int) and version > CHECKPOINT_FORMAT
                        else ""))
    return ckpt


class StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a polite stop (save, then exit); a second Ctrl-C
    exits at once."""

    def __init__(self):
        self.requested = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested} received: saving a resumable checkpoint "
              "(press Ctrl-C again to quit at once)", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def check_finite(loss, step, lr):
    if not math.isfinite(loss):
        raise UserError(f"the loss became {loss} by step {step} (learning rate {lr:.3g}); "
                        "training stopped and the last good checkpoints were kept. Try a lower --lr.")


def fit(model, optimizer, loss_fn, train_batches, val_data, cfg, state, save, device,
        scaler=None, rank=0, world=1, log=print, eval_model=None, ema=None):
    """Train until cfg.epoch_num epochs or early stopping, validating as cfg says.

    `state` holds step, stopper, lr factor from plateaus, history and the seconds spent so far
    (all restored on resume); `save(kind)` writes the 'best' or 'last' checkpoint. `eval_model`
    is the plain module when `model` is wrapped (DDP, torch.compile). `ema`, a
    torch.optim.swa_utils.AveragedModel, is updated after every step; it is the model that is
    validated (the raw weights are validated too, for the record). Returns why training ended."""
    from tqdm import tqdm
    steps_per_epoch = len(train_batches)
    total_steps = cfg.epoch_num * steps_per_epoch
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)
    every = cfg.num_iter_to_validate or cfg.num_epoch_to_validate * steps_per_epoch
    autocast = torch.autocast(device.type, dtype=cfg.amp_dtype, enabled=cfg.amp_dtype is not None)
    stopper = state["stopper"]
    # Sums of loss, correct answers and faces since the last validation (saved, so a resumed
    # run reports the same training numbers).
    running = state["running"] = state["running"].to(device).float()
    base_elapsed, session_start, images_done = state["elapsed"], time.perf_counter(), 0

    def tick():
        state["elapsed"] = base_elapsed + time.perf_counter() - session_start

    def progress_bar(epoch, done):
        return tqdm(total=steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}/{cfg.epoch_num}",
                    disable=rank != 0, leave=False, dynamic_ncols=True)

    ended, stopping = "finished all epochs", None
    with StopRequest() as stop:
        while state["step"] < total_steps and not stopper.should_stop and not stopping:
            epoch, start = divmod(state["step"], steps_per_epoch)
            model.train()
            bar = progress_bar(epoch, start)
            for batch, images, labels in train_batches.epoch(epoch, start):
                lr = cfg.lr * state["lr_factor"] * lr_factor(state["step"], total_steps,
                                                             warmup_steps, cfg.scheduler)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x = augment(images.to(device, non_blocking=True),
                            batch_generator(cfg.seed, epoch, batch), erase_p=cfg.erase_p)
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                y = labels.to(device, non_blocking=True)
                with autocast:
                    logits = model(x)
                loss = loss_fn(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:  # fp16 only; bf16 needs no loss scaling
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                if ema is not None:
                    ema.update_parameters(eval_model or model)
                state["step"] += 1
                if not images_done:
                    log(f"first training step done {time.perf_counter() - session_start:.2f} s "
                        "after the loop started")
                images_done += len(y)
                correct = (logits.detach().argmax(1) == y).sum().float()
                running += torch.stack([loss.detach() * len(y), correct, torch.ones_like(correct) * len(y)])
                bar.update(1)
                last_step = state["step"] == total_steps
                if state["step"] % 20 == 0 or last_step:
                    # One host sync per 20 steps (not per step): the bar and the NaN check share it,
                    # and under torchrun the ranks agree there on whether a stop was requested.
                    loss_sum, correct, seen = running.tolist()
                    check_finite(loss_sum / seen, state["step"], lr)
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
                    if world > 1:
                        flag = torch.tensor([float(stop.requested is not None)], device=device)
                        torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX)
                        stopping = (stop.requested or "SIGTERM") if flag.item() else None
                if world == 1:
                    stopping = stop.requested
                if stopping:
                    break
                if state["step"] % every and not last_step:
                    continue
                bar.close()
                loss_sum, correct, seen = running.tolist()
                train_loss, train_acc = loss_sum / seen, correct / seen
                check_finite(train_loss, state["step"], lr)
                if world > 1:
                    # BatchNorm statistics drift apart on each rank's own batches; validate (and
                    # save) with rank 0's, which DDP hands to every rank before each forward anyway.
                    buffers = list((eval_model or model).buffers())
                    for buffer in buffers + (list(ema.module.buffers()) if ema is not None else []):
                        torch.distributed.broadcast(buffer, 0)
                with autocast:  # bf16 validation under --amp: 1.7x faster, same accuracy to 0.1%
                    raw = evaluate(eval_model or model, *val_data, cfg.eval_batch_size, device, rank, world)
                    val_loss, val_acc = (raw if ema is None else evaluate(
                        ema.module, *val_data, cfg.eval_batch_size, device, rank, world))
                check_finite(val_loss, state["step"], lr)
                model.train()
                improved = stopper.update(val_loss if cfg.early_stop == "loss" else val_acc)
                if cfg.scheduler == "plateau" and not improved and stopper.bad % cfg.plateau_patience == 0:
                    state["lr_factor"] *= cfg.plateau_factor
                tick()
                state["history"].append({
                    "step": state["step"], "epoch": round(state["step"] / steps_per_epoch, 4),
                    "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                    "val_acc": val_acc, "lr": lr, "time": round(state["elapsed"], 2),
                    **({"val_loss_raw": raw[0], "val_acc_raw": raw[1]} if ema is not None else {})})
                log(f"step {state['step']} (epoch {state['step'] / steps_per_epoch:.2f}): train loss "
                    f"{train_loss:.4f} acc {train_acc:.4f} | val loss {val_loss:.4f} acc {val_acc:.4f}"
                    + (f" (raw weights {raw[1]:.4f})" if ema is not None else "") +
                    f" | best val {cfg.early_stop} {stopper.best:.4f}{' (new)' if improved else ''}"
                    f" | patience left {cfg.patience - stopper.bad}")
                if improved:
                    save("best")
                save("last")
                running.zero_()
                if stopper.should_stop:
                    ended = f"early stopping after {cfg.patience} validations without improvement"
                    break
                bar = progress_bar(epoch, batch + 1)
            bar.close()
        if stopping:
            tick()
            save("last")
            ended = f"stopped by {stopping}"
    tick()
    seconds = time.perf_counter() - session_start
    state["images_per_s"] = images_done * world / max(seconds, 1e-9)
    return ended
