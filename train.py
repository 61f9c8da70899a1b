"""The training pieces: batched augmentation, the learning-rate schedule, the weight average,
the training steps between two validations, and evaluation. run.py drives them, as
torchvision's classification reference drives train_one_epoch: it decides when to validate,
stop and save.

Resume is exact because everything random is either a pure function of (seed, epoch, batch)
(the shuffling and the augmentation) or saved in the checkpoint (the dropout RNG).
"""
import math
import signal
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import predict
from utils import NUM_CLASSES, UserError, to_unit_float


@dataclass
class Parts:
    """What the training steps work with besides the data: run.training_parts builds it."""
    model: torch.nn.Module  # the module trained (wrapped for DDP or torch.compile when asked)
    optimizer: torch.optim.Optimizer
    loss_fn: torch.nn.Module
    ema: object = None  # torch.optim.swa_utils.AveragedModel, or None
    scaler: object = None  # fp16 loss scaler, or None
    amp_dtype: torch.dtype = None  # autocast dtype, or None for fp32
    teachers: list = field(default_factory=list)  # eval-mode models to distil from
    teacher_weights: torch.Tensor = None  # (training faces, teachers): which teachers label which face
    world: int = 1  # processes under torchrun


def augment(images, generator, args):
    """Batched augmentation of uint8 (N, 1, H, W) faces -> float [0, 1], with the ranges of
    `args` (run.py's augmentation flags).

    One random affine map per face (rotation, scale, shift, horizontal flip) applied by a single
    grid_sample over the whole batch, then random erasing of one rectangle per face. The random
    numbers come from `generator` (on the CPU) so a run repeats exactly."""
    n, _, h, w = images.shape
    x = to_unit_float(images)
    rnd = torch.rand(n, 6, generator=generator).to(x.device)
    angle = (rnd[:, 0] * 2 - 1) * math.radians(args.max_rotate)
    zoom = args.scale[0] + rnd[:, 1] * (args.scale[1] - args.scale[0])
    flip = torch.where(rnd[:, 2] < 0.5, -1.0, 1.0)
    shift = (rnd[:, 3:5] * 2 - 1) * (2 * args.max_shift)  # grid units span 2 across the image
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if args.erase_p > 0:
        # One rectangle per image (its area a share of the face in --erase_area, its aspect ratio
        # log-uniform in [1/--erase_ratio, --erase_ratio]), filled with grey noise, with prob erase_p.
        box = torch.rand(n, 5, generator=generator).to(x.device)
        low, high = args.erase_area
        area = (low + box[:, 0] * (high - low)) * h * w
        ratio = torch.exp((box[:, 1] * 2 - 1) * math.log(args.erase_ratio))
        eh = (area * ratio).sqrt().clamp(max=h)
        ew = (area / ratio).sqrt().clamp(max=w)
        top = box[:, 2] * (h - eh)
        left = box[:, 3] * (w - ew)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + eh).view(-1, 1, 1)) &
                  (cols >= left.view(-1, 1, 1)) & (cols < (left + ew).view(-1, 1, 1)) &
                  (box[:, 4] < args.erase_p).view(-1, 1, 1))
        noise = torch.rand(x.shape, generator=generator).to(x.device)
        x = torch.where(inside.unsqueeze(1), noise, x)
    return x


def mixup(x, labels, generator, alpha):
    """Mixup (Zhang et al., ICLR 2018): every face of the batch blended with another one of it,
    with one weight lam ~ Beta(alpha, alpha) per batch, taken as max(lam, 1 - lam) (the same
    distribution, as fastai does) so that each face's own label stays the larger part. Returns
    (mixed faces, the partners' labels, lam). The draws come after the augmentation's from the
    batch's generator, so the augmentation is unchanged and a resumed run repeats them. With
    teachers, they label the mixed faces: faces they have not memorised (Beyer et al., CVPR 2022)."""
    partner = torch.randperm(len(x), generator=generator)
    seed = int(torch.randint(2 ** 62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    lam = max(lam, 1 - lam)
    return lam * x + (1 - lam) * x[partner.to(x.device)], labels[partner.to(labels.device)], lam


def batch_generator(seed, epoch, batch):
    """The CPU generator for one batch's augmentation: a pure function of its position."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + batch)


def class_weights(labels, num_classes=NUM_CLASSES):
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


def evaluate(model, batches, world=1):
    """Plain (unweighted) cross-entropy and accuracy over a dataset.Batches, from predict.predict
    (the one evaluation path), reduced over ranks."""
    idx = torch.cat(batches.epoch_indices(0)).to(batches.labels.device)  # this rank's shard, in order
    probs = predict.predict(model, batches.images[idx, 0], batch_size=batches.batch_size,
                            device=batches.device)
    labels = batches.labels[idx].cpu().numpy()
    picked = np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)
    dtype = torch.float32 if batches.device.type == "mps" else torch.float64  # MPS has no float64
    totals = torch.tensor([-np.log(picked).sum(), (probs.argmax(1) == labels).sum(), len(labels)],
                          dtype=dtype, device=batches.device)  # loss sum, correct, faces
    if world > 1:
        torch.distributed.all_reduce(totals)
    return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()


def weight_average(model, decay, warmup):
    """torch.optim.swa_utils.AveragedModel of `model`: an exponential moving average of its
    weights and BatchNorm statistics, updated after every training step."""
    from torch.optim.swa_utils import AveragedModel
    return AveragedModel(model, multi_avg_fn=ema_update_fn(decay, warmup), use_buffers=True)


def unwrap(model):
    """The plain module inside torch.compile's and DistributedDataParallel's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def ema_update_fn(decay, warmup=10):
    """A multi_avg_fn for torch.optim.swa_utils.AveragedModel: an exponential moving average
    whose decay warms up as min(decay, (1 + n) / (warmup + n)) after n updates (TensorFlow's
    ExponentialMovingAverage with num_updates uses warmup 10). With a fixed 0.999 the average of
    a 150-step run would still be mostly its random initialisation."""
    def update(ema_tensors, tensors, num_averaged):
        n = float(num_averaged)
        d = min(decay, (1 + n) / (warmup + n))
        if ema_tensors[0].is_floating_point():
            torch._foreach_lerp_(ema_tensors, tensors, 1 - d)
        else:  # BatchNorm's num_batches_tracked: keep the model's count
            torch._foreach_copy_(ema_tensors, tensors)
    return update


def teacher_probabilities(teachers, images, temperature, weights=None):
    """The teachers' softened class probabilities on the same (augmented) images, averaged: the
    soft target of distillation. `weights` (images, teachers), rows summing to 1, average each
    face over its own teachers instead (run.teacher_weights: those that never saw it). Teachers
    are in eval mode; no gradients flow into them."""
    with torch.no_grad():
        probs = torch.stack([F.softmax(t(images).float() / temperature, 1) for t in teachers])
        # A product and a sum, not einsum: autocast would run einsum in bf16 / fp16.
        return probs.mean(0) if weights is None else (probs * weights.t()[:, :, None]).sum(0)


def distillation_loss(hard_loss, logits, soft_targets, alpha, temperature):
    """(1 - alpha) * the usual loss + alpha * T^2 * KL(teachers_T || student_T) (Hinton et al.,
    2015): T^2 keeps the soft term's gradients on the scale of the hard one's as T changes."""
    log_student = F.log_softmax(logits / temperature, 1)
    soft_loss = F.kl_div(log_student, soft_targets, reduction="batchmean") * temperature ** 2
    return (1 - alpha) * hard_loss + alpha * soft_loss


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


class Diverged(UserError):
    """The loss stopped being a finite number; run.main says what the run folder still holds."""


def check_finite(loss, step, lr):
    if not math.isfinite(loss):
        raise Diverged(f"the loss became {loss} by step {step} (learning rate {lr:.3g}); training stopped")


def train_steps(parts, batches, state, args, until, stop, show_progress=True):
    """Train parts.model from state.step up to step `until` (across epoch boundaries), updating
    the weight average after every step; `args` are run.py's settings. Returns (train loss,
    train accuracy (against each face's own label, the larger part under --mixup), faces seen, why
    it stopped early or None). With teachers (parts.teachers) the loss is the distillation loss.

    The loss is checked every 20 steps (one host sync, shared with the progress bar); under
    torchrun the ranks agree there on whether a Ctrl-C / SIGTERM (`stop.requested`) stops them."""
    from tqdm import tqdm
    model, optimizer = parts.model, parts.optimizer
    steps_per_epoch = len(batches)
    total_steps = args.epoch_num * steps_per_epoch
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)
    sums = torch.zeros(3, device=batches.device)  # loss * faces, correct answers, faces
    first_epoch = state.step // steps_per_epoch
    bar = tqdm(total=until - state.step, desc=f"epoch {first_epoch + 1}/{args.epoch_num}",
               disable=not show_progress, leave=False, dynamic_ncols=True)
    model.train()
    stopping = None
    while state.step < until and not stopping:
        epoch, start = divmod(state.step, steps_per_epoch)
        stop_at = min(steps_per_epoch, start + until - state.step)
        for batch, faces, images, labels in batches.epoch(epoch, start, stop_at):
            lr = args.lr * state.lr_factor * lr_factor(state.step, total_steps, warmup_steps,
                                                       args.scheduler)
            for group in optimizer.param_groups:
                group["lr"] = lr
            generator = batch_generator(args.seed, epoch, batch)
            x = augment(images, generator, args)
            if args.mixup > 0:
                x, partner_labels, lam = mixup(x, labels, generator, args.mixup)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with predict.autocast(batches.device, parts.amp_dtype):
                logits = model(x)
                soft_targets = (teacher_probabilities(
                    parts.teachers, x, args.kd_temperature,
                    None if parts.teacher_weights is None else parts.teacher_weights[faces])
                    if parts.teachers else None)
            loss = parts.loss_fn(logits.float(), labels)
            if args.mixup > 0:
                loss = lam * loss + (1 - lam) * parts.loss_fn(logits.float(), partner_labels)
            if soft_targets is not None:
                loss = distillation_loss(loss, logits.float(), soft_targets, args.kd_alpha,
                                         args.kd_temperature)
            optimizer.zero_grad(set_to_none=True)
            if parts.scaler is not None:  # fp16 only; bf16 needs no loss scaling
                parts.scaler.scale(loss).backward()
                parts.scaler.step(optimizer)
                parts.scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if parts.ema is not None:
                parts.ema.update_parameters(unwrap(model))
            state.step += 1
            correct = (logits.detach().argmax(1) == labels).sum().float()
            sums += torch.stack([loss.detach() * len(labels), correct, torch.ones_like(correct) * len(labels)])
            bar.update(1)
            if state.step % 20 == 0 or state.step == until:
                loss_sum, correct, seen = sums.tolist()
                check_finite(loss_sum / seen, state.step, lr)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
                if parts.world > 1:
                    flag = torch.tensor([float(stop.requested is not None)], device=batches.device)
                    torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX)
                    stopping = (stop.requested or "SIGTERM") if flag.item() else None
            if parts.world == 1:
                stopping = stop.requested
            if stopping:
                break
    bar.close()
    loss_sum, correct, seen = sums.tolist()
    return loss_sum / max(seen, 1), correct / max(seen, 1), int(seen), stopping


