"""Checkpoints in one place: what a file holds, writing and reading it safely, the model inside,
and the small inference-only export.

A training checkpoint holds what resuming needs: the weights and their moving average, the
optimiser (and loss scaler) state, the train.TrainState, the RNG states, and the run's name and
arguments. Nothing in it says where to write: a resumed run writes where the command that
resumes it says. Files are read with torch.load(weights_only=True): tensors and plain values
only, so a file cannot run code.
"""
import dataclasses
import glob
import os
import pickle
from dataclasses import dataclass, field

import torch

from models import MODEL_NAMES, FerNet
from utils import EMOTIONS, UserError, check_writable, class_names_problem, save_torch

FORMAT = 2  # the layout of today's files (the shipped exports included); format 1 is not read
EXPORT = "export"  # the `kind` of an inference-only file
PATH_ARGS = ("dataset", "checkpoint", "checkpoint_dir", "output", "init_from", "teacher")  # run.py's path flags


@dataclass
class TrainState:
    """Where a run stands: all of it is saved in the checkpoints and restored on resume."""
    step: int = 0
    best_score: float | None = None  # best validation score so far (loss or accuracy)
    bad_validations: int = 0  # validations since that best
    lr_factor: float = 1.0  # product of the plateau scheduler's cuts
    elapsed: float = 0.0  # seconds of training and validation so far, over all sessions
    history: list = field(default_factory=list)  # one dict per validation

    def record(self, score, mode):
        """Count a validation score (mode 'loss': lower is better); True when it is a new best."""
        better = self.best_score is None or (score < self.best_score if mode == "loss"
                                             else score > self.best_score)
        self.best_score, self.bad_validations = ((score, 0) if better
                                                 else (self.best_score, self.bad_validations + 1))
        return better


def training_checkpoint(kind, args, model, optimizer, state, rng, *, scaler=None, ema=None, **about):
    """The dict saved as <model>_best.pth / <model>_last.pth. `about` adds what the run knows of
    itself: pretrained_used, dataset, class_counts ({split: faces per class}: a resume with -d
    must find the same data there), world_size."""
    return {
        "format_version": FORMAT, "kind": kind, "model_name": args.model,
        "class_names": list(model.class_names), "model_state": model.state_dict(),
        # The averaged weights are the ones validated, selected and shipped (see model_weights).
        "ema_state": ema.module.state_dict() if ema is not None else None,
        "ema_updates": int(ema.n_averaged) if ema is not None else 0,
        "optimizer_state": optimizer.state_dict(),
        "scaler_state": scaler.state_dict() if scaler is not None else None,
        "train_state": dataclasses.asdict(state), "rng": rng, "args": dict(vars(args)),
        "run_name": args.run_name, "pretrained_used": False, "world_size": 1, **about}


def finite(weights):
    """Whether every floating-point tensor of a state dict is finite (no NaN, no infinity)."""
    return all(v.isfinite().all() for v in weights.values() if v.is_floating_point())


def kept_note(folder):
    """What a run that stopped on numbers that are not finite leaves in its folder, in words."""
    if glob.glob(os.path.join(glob.escape(folder), "*.pth")):
        return f"the checkpoints in {folder} are the last good ones"
    return "no checkpoint was saved before that"


def save(ckpt, path):
    """Write a checkpoint atomically; weights that are not finite (a diverged run) are refused,
    so they never replace a good file."""
    if not all(finite(ckpt.get(name) or {}) for name in ("model_state", "ema_state")):
        raise UserError(f"the weights are no longer finite numbers (training diverged), so they "
                        f"were not written to {path}; "
                        + kept_note(os.path.dirname(os.path.abspath(path))))
    save_torch(ckpt, path)


def load(path):
    """Load one of our checkpoints safely; anything else is a UserError that says what it is."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint file at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "unsupported global" in str(err).lower():  # a pickle that names code to call
            raise UserError(f"{path} contains code or Python objects that this tool will not load "
                            "(it reads only tensors and plain values).") from err
        raise UserError(f"{path} is damaged or is not a PyTorch file.") from err
    except Exception as err:  # truncated, corrupt, not a zip archive
        raise UserError(f"{path} is damaged or is not a PyTorch file ({type(err).__name__}).") from err
    if not isinstance(ckpt, dict) or "model_state" not in ckpt or "model_name" not in ckpt:
        raise UserError(f"{path} is a PyTorch file but not a checkpoint of this tool")
    version = ckpt.get("format_version")
    if version != FORMAT:
        newer = isinstance(version, int) and version > FORMAT
        raise UserError(f"{path} has checkpoint format {version!r}; this version of the tool reads "
                        f"format {FORMAT}" + (" (it was written by a newer version; update the "
                                              "tool)" if newer else " (an older version's file)"))
    # The file's class names are its model's classes: FER2013's seven, or a folder's (folders.py).
    problem = class_names_problem(ckpt.setdefault("class_names", list(EMOTIONS)))
    if problem:
        raise UserError(f"{path} names its classes {str(ckpt['class_names'])[:200]}, which is "
                        f"refused: {problem}")
    return ckpt


def train_state(ckpt, path):
    """The TrainState saved in a training checkpoint; an inference-only file is a UserError that
    shows how to fine-tune from it instead, and a damaged one a UserError that says so."""
    if "train_state" not in ckpt or ckpt.get("kind") == EXPORT:
        raise UserError(f"{path} is an inference-only file (no optimiser or progress), so there is "
                        f"no run to resume; to train further from its weights start a new run: "
                        f"python3 run.py -m {ckpt['model_name']} --init_from {path}")
    number = (int, float)
    try:
        state = TrainState(**ckpt["train_state"])
        whole = (isinstance(state.step, int) and state.step >= 0 and isinstance(state.bad_validations, int)
                 and isinstance(state.lr_factor, number) and isinstance(state.elapsed, number)
                 and isinstance(state.history, list) and isinstance(state.best_score, (*number, type(None)))
                 and isinstance(ckpt.get("args"), dict) and isinstance(ckpt.get("rng"), list)
                 and isinstance(ckpt.get("optimizer_state"), dict))
    except TypeError:  # fields this version does not know, or not a dict at all
        whole = False
    if not whole:
        raise UserError(f"{path} is damaged: its progress, settings or optimiser state is not what "
                        "run.py saves, so the run cannot be resumed from it")
    return state


def model_weights(ckpt):
    """The weights that were validated: the moving average when the run kept one."""
    return ckpt["ema_state"] if ckpt.get("ema_state") is not None else ckpt.get("model_state")


def build_model(ckpt, device="cpu", source=None):
    """Rebuild the model a checkpoint holds (its name and normalisation come from the file), in
    eval mode; fp16-stored weights are fine. Unknown names or weights that do not fit raise
    UserError."""
    where = f"{source}: " if source else ""
    name = ckpt.get("model_name")
    if name not in MODEL_NAMES:
        raise UserError(f"{where}the checkpoint holds a model named {name!r}, which this version of "
                        f"the tool does not know; known models: {', '.join(MODEL_NAMES)}")
    state = model_weights(ckpt)
    names = ckpt.get("class_names", EMOTIONS)
    outputs = state.get("classifier.4.bias") if isinstance(state, dict) else None
    if outputs is not None and len(outputs) != len(names):
        raise UserError(f"{where}the checkpoint names its classes {', '.join(names)[:200]} ({len(names)}), "
                        f"but its weights have {len(outputs)} outputs")
    model = FerNet(name, class_names=names)
    load_weights(model, state, source)
    return model.to(device).eval()


def load_weights(module, weights, source=None):
    """Load a checkpoint's state dict into `module` (fp16 weights too). Weights that are not
    tensors, do not fit, or are not finite raise one-line UserErrors naming `source`."""
    where = f"{source}: " if source else ""
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise UserError(f"{where}the checkpoint's model_state is not a set of weights")
    if not finite(weights):
        raise UserError(f"{where}some weights are not finite (NaN or infinity: saved from a run that "
                        "diverged?), so the file is refused")
    try:
        module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
    except RuntimeError as err:  # it lists every key: the first says enough
        lines = str(err).strip().splitlines()
        first = next((line.strip() for line in lines[1:] if line.strip()), lines[0])[:300]
        name = getattr(module, "name", type(module).__name__)
        raise UserError(f"{where}the weights in the checkpoint do not fit a {name} ({first})") from err


def resolve(path, kind="best"):
    """A checkpoint file; a run folder holding exactly one *_<kind>.pth stands for that file."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return path
    found = sorted(glob.glob(os.path.join(path, f"*_{kind}.pth")))
    if len(found) == 1:
        return found[0]
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.pth")))
    raise UserError(f"{path} is a folder; pass a checkpoint file" +
                    (f" (it holds {', '.join(found)})" if found else " (it holds no .pth files)"))


def file_names(value):
    """A path flag's value without its folders (a list of paths: each); other values as they are."""
    if isinstance(value, str):
        return os.path.basename(value)
    if isinstance(value, list):
        return [os.path.basename(v) if isinstance(v, str) else v for v in value]
    return value


def check_export_target(path, destination, training=False):
    """Refuse a destination whose file would be lost: an export only replaces an earlier export
    (a training checkpoint holds a run that could no longer be resumed; any other file is the
    user's), never the file it reads, a folder, or a folder that cannot be written."""
    destination = os.fspath(destination)
    if not destination or destination.endswith(os.sep) or os.path.isdir(destination):
        raise UserError(f"--export needs a file name, not {'a folder, ' + destination if destination else 'an empty one'}")
    if os.path.exists(destination):
        if os.path.exists(path) and os.path.samefile(path, destination):
            raise UserError(f"--export {destination} would replace the file it reads"
                            + (" (and lose its training state)" if training else "") + ": choose another file name")
        if not earlier_export(destination):
            raise UserError(f"{destination} exists and is not an earlier export (it is a training "
                            "checkpoint or another file): --export only replaces an earlier export, so "
                            "it is left as it is; choose another file name")
    check_writable(os.path.dirname(os.path.abspath(destination)))


def earlier_export(path):
    """Whether `path` holds an inference-only file of this tool (.pth, or .onnx) and nothing more."""
    if os.fspath(path).lower().endswith(".onnx"):
        import onnx_model
        return onnx_model.exported_here(path)
    try:
        ckpt = load(path)
    except UserError:
        return False
    return ckpt.get("kind") == EXPORT and not {"train_state", "optimizer_state"} & set(ckpt)


def export(path, destination):
    """An inference-only copy: the validated weights in fp16 and the run's description; to a
    destination ending in .onnx, an fp32 ONNX model with a dynamic batch (onnx_model.export).
    The destination is checked before anything is written (check_export_target)."""
    if os.fspath(path).lower().endswith(".onnx"):
        raise UserError(f"{path} is already an ONNX file; export from the .pth checkpoint")
    ckpt = load(path)
    check_export_target(path, destination, training="train_state" in ckpt)
    model = build_model(ckpt, source=path)  # refuse to export what could not be loaded
    if os.fspath(destination).lower().endswith(".onnx"):
        import onnx_model  # its packages are optional: needed only here
        step = ckpt.get("train_state", {}).get("step", ckpt.get("step"))  # an export keeps its "step"
        return onnx_model.export(model, destination, {
            "run_name": ckpt.get("run_name"), "dataset": os.path.basename(ckpt.get("dataset") or ""), "step": step,
            "pretrained_used": ckpt.get("pretrained_used"), "source": os.path.basename(path)})
    keep = ("model_name", "class_names", "pretrained_used", "run_name", "step", "history")  # an export's own
    small = {k: ckpt[k] for k in keep if k in ckpt}
    # The run's settings travel with the weights, but not this machine's paths (only file names).
    small["args"] = {k: file_names(v) if k in PATH_ARGS else v for k, v in ckpt.get("args", {}).items()}
    small["dataset"] = os.path.basename(ckpt["dataset"]) if ckpt.get("dataset") else None
    if "train_state" in ckpt:
        small["history"] = ckpt["train_state"]["history"]
        small["step"] = ckpt["train_state"]["step"]
    small.update(format_version=FORMAT, kind=EXPORT, model_state={
        k: v.half() if v.is_floating_point() else v for k, v in model_weights(ckpt).items()})
    save_torch(small, destination)
    return destination
