"""Models as ONNX files: export with torch.onnx, run with onnxruntime (both optional installs).

    python3 infer.py -c pretrained/fer2013_vgg2_4_2_conv5.pth --export conv5.onnx
    python3 infer.py -c conv5.onnx --images me.jpg        # the same reports, through onnxruntime

The file takes grey faces `faces`: float32 (N, 1, 48, 48) in [0, 1], any N, and gives `logits`
(N, classes): FER2013's 7, or those of the folder the model was trained on; softmax turns them
into the class probabilities. The input normalisation is inside, as in the PyTorch model. The
model's name, the class names and where it came from travel in the file's metadata_props, so
reports can name the model and its classes, and refuse files of other tools.

Export uses torch.onnx.export's default exporter (torch.export-based, `dynamo=True`): it is the
one PyTorch maintains (the TorchScript exporter is deprecated since torch 2.9), and it writes the
smaller graph here (no Equal/Where around the grey-to-RGB expand). It needs onnxscript (which
brings onnx). Opset 18: what that exporter emits natively, read by onnxruntime 1.14 and later.
Running a file needs only onnxruntime.
"""
import contextlib
import io
import json
import os

import torch

from utils import SIDE, UserError, atomic_write, class_names_problem

OPSET = 18
INPUT, OUTPUT = "faces", "logits"
FORMAT = "fer2013-onnx-1"  # the `format` metadata entry of files written here


def is_onnx(path):
    return os.fspath(path).lower().endswith(".onnx")


def _import(module, why):
    try:
        return __import__(module)
    except ImportError as err:
        raise UserError(f"{why} needs the optional package {module}, which is not installed: "
                        f"pip install {module}") from err


def export(model, path, metadata=None):
    """Write `model` (a FerNet) as an fp32 ONNX file with a dynamic batch dimension, its name and
    the class names (plus `metadata`, a dict of strings) in metadata_props. Returns the path."""
    _import("onnxscript", "--export to .onnx (torch.onnx's exporter)")
    _import("onnx", "--export to .onnx")
    model = model.float().eval()
    example = torch.rand(2, 1, SIDE, SIDE)  # batch 2: a batch of 1 would be taken as fixed
    # The exporter reports each stage on stdout; a clean command line does not need that.
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT],
            output_names=[OUTPUT], dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
            verbose=False)
    proto = program.model_proto
    proto.doc_string = (f"{model.name}: grey faces {INPUT} (N, 1, {SIDE}, {SIDE}) in [0, 1] -> "
                        f"{OUTPUT} (N, {len(model.class_names)}) for {', '.join(model.class_names)}")
    entries = {"format": FORMAT, "model_name": model.name, "class_names": json.dumps(list(model.class_names)),
               **{k: str(v) for k, v in (metadata or {}).items() if v is not None}}
    for key, value in entries.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, value
    atomic_write(path, lambda f: f.write(proto.SerializeToString()))
    return path


def exported_here(path):
    """Whether `path` is an ONNX file that this tool exported (its metadata says so)."""
    onnx = _import("onnx", "--export to .onnx")
    try:
        with open(path, "rb") as f:
            proto = onnx.load_model_from_string(f.read())
    except Exception:  # not ONNX at all
        return False
    return any(p.key == "format" and p.value == FORMAT for p in proto.metadata_props)


class OnnxModel(torch.nn.Module):
    """An exported file run by onnxruntime on the CPU, where infer.predict takes a model: it has a
    `name`, eval(), and model(faces) -> logits as a tensor on the faces' device.

    onnxruntime uses as many threads as PyTorch does (torch.get_num_threads() when the file is
    loaded), so one setting governs both."""

    def __init__(self, path, threads=None):
        super().__init__()
        path = os.fspath(path)
        ort = _import("onnxruntime", "reading an .onnx checkpoint")
        if not os.path.isfile(path):
            raise UserError(f"no checkpoint file at {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: no warnings about unused initialisers
        try:  # from bytes read here: onnxruntime takes no path that is not UTF-8
            with open(path, "rb") as f:
                self.session = ort.InferenceSession(f.read(), options, providers=["CPUExecutionProvider"])
        except OSError as err:
            raise UserError(f"{path} cannot be read ({err.strerror or err})") from err
        except Exception as err:  # onnxruntime raises its own types for bad files
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise UserError(f"{path} is damaged or is not an ONNX model ({first})") from err
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        names = self.metadata.get("class_names")
        if self.metadata.get("format") != FORMAT or "model_name" not in self.metadata:
            raise UserError(f"{path} is an ONNX model but not one exported by this tool "
                            "(infer.py --checkpoint X.pth --export FILE.onnx writes them)")
        try:
            listed = json.loads(names) if names is not None else None
        except ValueError:  # not JSON: not ours either
            listed = None
        self.class_names = tuple(listed) if isinstance(listed, list) else None
        problem = class_names_problem(self.class_names)
        if problem:
            raise UserError(f"{path} names its classes {names[:200] if names else None}, which is "
                            f"refused: {problem}")
        self.name = self.metadata["model_name"]
        self.path = path
        self.check_answers()

    def check_answers(self):
        """One made-up face through the graph: an input or output of another shape, or weights
        that are not finite, are refused now rather than in the middle of a report."""
        try:
            logits = self(torch.full((1, 1, SIDE, SIDE), 0.5))
        except Exception as err:  # onnxruntime's own types
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise UserError(f"{self.path} does not take faces (N, 1, {SIDE}, {SIDE}) as this tool "
                            f"exports them ({first})") from err
        if tuple(logits.shape) != (1, len(self.class_names)):
            raise UserError(f"{self.path} gives {tuple(logits.shape)} values for one face, not "
                            f"{len(self.class_names)} class scores; refused")
        if not bool(logits.isfinite().all()):
            raise UserError(f"{self.path} gives scores that are not finite for a face (NaN or "
                            "infinity: weights from a run that diverged?); refused")

    def forward(self, x):
        faces = x.detach().to("cpu", torch.float32).contiguous().numpy()
        logits, = self.session.run([OUTPUT], {INPUT: faces})
        return torch.from_numpy(logits).to(x.device)
