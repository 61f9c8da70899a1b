"""Small helpers shared by the scripts: user-facing errors, command lines, atomic files,
devices, seeds."""
import argparse
import difflib
import errno
import hashlib
import json
import shutil
import os
import random
import re
import signal
import sys
import tempfile
import threading
import traceback

# The one definition of FER2013's classes, face size, default file and splits.
EMOTIONS = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")
NUM_CLASSES = len(EMOTIONS)
SIDE = 48  # faces are SIDE x SIDE grey pixels
DEFAULT_CSV = "./data/fer2013.csv"
SPLITS = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}  # name -> Usage column


MAX_CLASS_NAME = 100  # characters


def class_names_problem(names):
    """Why `names` cannot be a model's classes, or None when they can. A model of a folder has the
    folder's classes; the names end up in file names (faces/<class>_<i>.png) and CSV columns, so
    each must be a plain file name."""
    if not isinstance(names, (list, tuple)) or len(names) < 2:
        return "a model needs a list of at least two class names"
    if not all(isinstance(n, str) and 0 < len(n) <= MAX_CLASS_NAME for n in names):
        return f"every class name must be text of 1-{MAX_CLASS_NAME} characters"
    if len(set(names)) != len(names):
        return "two classes have the same name"
    if any(n.startswith(".") or re.search(r"[/\\\x00-\x1f\x7f]", n) for n in names):
        return "a class name is not a plain file name (a path, a leading dot or a control character)"
    return None


class UserError(Exception):
    """A mistake the user can fix (path, flag, data, checkpoint): shown as one message, exit 2."""


class DiskFull(UserError):
    """A write failed because the disk is full; the message says what was kept."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it ends as after a Ctrl-C: files finished,
    locks released (run.py's training loop turns both into a polite stop instead)."""


def _terminate(signum, frame):
    raise Terminated()


def run_cli(main, argv=None):
    """Run main(argv); user mistakes end in one clear message and a non-zero exit.

    `--debug` anywhere on the command line shows the full traceback instead. Ctrl-C and SIGTERM
    end in one line too (exit 130 and 143), after the `finally` blocks have run."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        # The scripts ignore Ctrl-C's traceback while their imports load (SIG_DFL); from here on
        # it is Python's KeyboardInterrupt again, and SIGTERM joins it.
        handlers = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                    signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate)}
    if hasattr(sys.stdout, "reconfigure"):  # a file name that is not UTF-8 never stops a message
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        return main(argv)
    except UserError as err:
        if debug:
            traceback.print_exc()
        print(f"error: {clip(err, 2000)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:
        print("\ninterrupted" + (" (SIGTERM)" if isinstance(err, Terminated) else ""), file=sys.stderr)
        sys.exit(143 if isinstance(err, Terminated) else 130)
    except Exception as err:  # a bug or an unexpected environment: short message, traceback on demand
        if debug:
            raise
        name = getattr(err, "filename", None)
        if full_disk(err):
            where = f" while writing {name}" if name else ""
            print(f"error: the disk is full (no space left on device){where}", file=sys.stderr)
            sys.exit(2)
        if isinstance(err, OSError) and name and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            # A file or folder the user can fix (read-only, not theirs) that no earlier check caught.
            print(f"error: {name}: {err.strerror}", file=sys.stderr)
            sys.exit(2)
        print(f"error: {type(err).__name__}: {clip(err, 2000)}\n(run again with --debug for the traceback)",
              file=sys.stderr)
        sys.exit(1)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def printable(path):
    """A path as text that can always be written (into a CSV, JSON or message): bytes of the name
    that are not UTF-8, which Python keeps as surrogate escapes, become `\\xff`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_utf8(path):
    """Whether a path's bytes are UTF-8: OpenCV's file functions crash on names that are not."""
    try:
        os.fsencode(path).decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def clip(text, limit=300):
    """Quoted input in a message: at most `limit` characters (a bad file's line can be 50 MB)."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters in all)"


class Parser(argparse.ArgumentParser):
    """argparse with whole option names only (no silent abbreviations), both `--a_b` and `--a-b`
    for every flag (see flag()), and mistakes reported in one line instead of under the usage."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
                         **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def emotion_index(value):
    """An argparse type: an emotion name in any case -> its index, with the closest name
    suggested on a typo."""
    by_lower = {name.lower(): name for name in EMOTIONS}
    return EMOTIONS.index(by_lower.get(value.lower()) or one_of(EMOTIONS, "emotion")(value))


def flag(group, *names, **kwargs):
    """group.add_argument with a `-` spelling added for every `_` one, and the other way round."""
    spellings = []
    for name in names:
        spellings.append(name)
        if name.startswith("--"):
            for other in (name[:2] + name[2:].replace("_", "-"), name[:2] + name[2:].replace("-", "_")):
                if other not in spellings and other not in names:
                    spellings.append(other)
    return group.add_argument(*spellings, **kwargs)


def path_arg(value):
    """An argparse type for paths: an empty string names nothing (os.path.join would take it for
    the current folder), so it is refused."""
    if not value:
        raise argparse.ArgumentTypeError("an empty path names no file or folder")
    return value


def device_flags(group):
    """--device and --amp, the same for training and inference."""
    flag(group, "--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
         help="auto: CUDA, then Apple MPS, then CPU (default: auto)")
    flag(group, "--amp", action=argparse.BooleanOptionalAction, default=None,
         help="mixed precision: bf16 on GPUs and CPUs that compute it natively, about 2x faster "
              "there at the same accuracy (within ~0.1 point); fp16 on older GPUs (default: on "
              "where bf16 is native: AVX512-BF16 or AMX CPUs, Ampere and newer GPUs)")


def one_of(choices, what):
    """An argparse type that accepts one of `choices` and suggests the closest on a typo."""
    def check(value):
        if value in choices:
            return value
        close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}? " if close else ""
        raise argparse.ArgumentTypeError(f"unknown {what} {value!r}; {hint}(one of {', '.join(choices)})")
    check.__name__ = what
    return check


def full_disk(err, folder=None):
    """Whether a failed write means the disk is full (torch.save says so only as a RuntimeError,
    so `folder`'s free space decides then)."""
    if isinstance(err, DiskFull):
        return True
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    if folder is None:
        return False
    try:
        return shutil.disk_usage(folder).free < 16 * 2**20
    except OSError:
        return False


def atomic_write(path, write, durable=True):
    """Call write(file_object) on a temporary file beside `path`, fsync it, then rename it over
    `path`: a crash or a full disk never leaves a half-written file, and the old one survives.
    The file gets the permissions of any new file (the umask), not mkstemp's private 0600.
    `durable=False` skips the fsync, for files made again by running the command again (an
    annotated copy: a folder of 1,000 small faces spent most of its time in fsync)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, (OSError, RuntimeError)) and full_disk(err, folder):
            raise DiskFull(f"the folder {folder} is full (no space left on device): could not write "
                            f"{os.path.basename(path)}; the files already there are intact") from err
        raise


def save_figure(fig, path, dpi=100):
    """Write a matplotlib Figure (object API, no pyplot state) as a PNG, atomically."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    return path


def to_unit_float(images):
    """uint8 images as float in [0, 1] (float images: as float32, unchanged)."""
    return images.float().div_(255) if not images.is_floating_point() else images.float()


def file_sha256(path):
    """The hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_torch(obj, path):
    import torch
    atomic_write(path, lambda f: torch.save(obj, f))


def save_json(obj, path):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode() + b"\n"))


def check_writable(folder):
    """Fail early, before any work, when an output folder cannot be created or written."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"cannot write to {folder}: {err.strerror or err}") from err


def new_folder(path, empty_is_new=False):
    """Create `path`, or `path_2`, `path_3`, ... where it exists, and return the one created:
    results never mix with earlier ones, and two calls started in the same second never share a
    timestamped folder. `empty_is_new`: an empty folder that exists is taken as it is (a folder
    the user made for the results). `out/` is `out`, and `.` the current folder by its name."""
    path = os.path.normpath(path)
    if os.path.basename(path) in (".", ".."):  # `._2` would be hidden inside it: take its name
        path = os.path.abspath(path)
    check_writable(os.path.dirname(path) or ".")
    candidate, k = path, 1
    while True:
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            if not os.path.isdir(candidate):
                if candidate == path:
                    raise UserError(f"{printable(path)} is a file, not a folder: give another output folder")
            elif empty_is_new and not os.listdir(candidate):
                return candidate
            k += 1
            candidate = f"{path}_{k}"


def select_device(name="auto"):
    import torch
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for, but Apple MPS is not available")
    return torch.device(name)


def eval_batch_size(batch_size, device):
    """`batch_size` when given, else the default for this device: 64 on a CPU (on the 2-core dev
    machine vgg2_4_ilrb_2 evaluates 1.25x faster at 64 than at 512, the other models within 20%
    either way, README "Speed"); 512 on a GPU, which needs large batches to stay busy."""
    if batch_size is not None:
        return batch_size
    kind = getattr(device, "type", str(device).split(":")[0])
    return 64 if kind == "cpu" else 512


def amp_dtype_for(device):
    """Mixed precision: bf16 where the device computes it natively (Ampere+ GPUs, AVX512-BF16 or
    AMX CPUs: about 2x faster convolutions here), else fp16 on CUDA (with loss scaling), else None."""
    import torch
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_computes_bf16():
        return torch.bfloat16
    return None


def cpu_computes_bf16():
    """Whether this CPU computes bf16 natively. oneDNN's own check also says yes on x86 CPUs with
    plain AVX512, where it emulates bf16: on a 2-core Intel Xeon without AVX512-BF16 or AMX,
    training under bf16 autocast ran 4x slower than fp32 (tools/bench.py, README "Speed"), so
    on x86 this asks for AVX512-BF16 or AMX; other CPUs keep oneDNN's answer."""
    import platform
    import torch
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "x86", "i686"):
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return True


def autocast_dtype(amp, device):
    """The autocast dtype for --amp (True), --no-amp (False) or neither (None: bf16 where the
    device computes it natively, since there it is about 2x faster at the same accuracy)."""
    import torch
    dtype = amp_dtype_for(device) if amp is not False else None
    return None if amp is None and dtype != torch.bfloat16 else dtype


def reuse_freed_memory(device):
    """On a CPU device, ask glibc to serve every allocation from its heap and keep freed memory
    for reuse (GPU activations live in the GPU's own caching allocator: nothing to do there).

    By default glibc hands blocks over 32 MB to fresh mmap()s and unmaps them on free, so every
    large activation of every training step page-faults its memory in again. tools/bench.py
    --compare_reuse on the 2-core dev CPU (bf16, shared with a training run): vgg2_4_ilrb_2 trains
    1.35x faster with reuse, vgg2_4_2_conv3 the same (1.0x), evaluation no faster, so only run.py
    calls it (results/bench_hacks_cpu*.json). The price is that the process does not
    return its peak memory to the system until it exits. Returns whether the setting took effect
    (False for other devices, and off glibc, e.g. macOS, Windows, musl)."""
    import ctypes
    if device.type != "cpu":
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from <malloc.h>
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def seed_everything(seed):
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
