"""The five VGG11-prefix models for FER2013.

    python3 models.py            # table: parameters, GFLOP per 48x48 image, output shape

Every model starts with the first two convolutional blocks of torchvision's VGG11-BN
(`vgg11_bn().features[:7]`), built here layer by layer with the same indices so ImageNet weights
load into it without building the full 130M-parameter network. A small spec table says what
follows the prefix; one constructor builds every variant from it.
"""
import os
import sys

import torch
from torch import nn

from utils import EMOTIONS, SIDE, UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Without ImageNet weights, centre the grey levels around zero (FER2013's mean grey is ~0.5).
PLAIN_MEAN = (0.5, 0.5, 0.5)
PLAIN_STD = (0.25, 0.25, 0.25)

# What follows the 128 x 24 x 24 prefix output, layer by layer:
#   ("cbp", in, out, kernel, padding)   Conv(bias=False) + BN + PReLU
#   ("irb", in, expanded, out)          MobileNetV2 inverted residual block, linear bottleneck
#   ("max",) / ("avg",)                 2x2 pooling; ("adaptive", size) adaptive average pooling
# and the number of features the classifier receives.
SPECS = {
    "vgg2_0_2": ([("adaptive", 6)], 128 * 6 * 6),
    "vgg2_2_2": ([("cbp", 128, 256, 3, 1), ("max",), ("cbp", 256, 512, 3, 1), ("avg",)], 512 * 6 * 6),
    "vgg2_4_2_conv3": ([("cbp", 128, 128, 3, 1), ("cbp", 128, 128, 3, 1), ("max",),
                        ("cbp", 128, 256, 3, 1), ("cbp", 256, 512, 3, 1), ("avg",)], 512 * 6 * 6),
    "vgg2_4_2_conv5": ([("cbp", 128, 128, 5, 0), ("cbp", 128, 128, 5, 0), ("max",),
                        ("cbp", 128, 256, 5, 1), ("cbp", 256, 512, 3, 1)], 512 * 6 * 6),
    "vgg2_4_ilrb_2": ([("irb", 128, 1024, 128), ("irb", 128, 1024, 128), ("max",),
                       ("irb", 128, 1280, 256), ("irb", 256, 1280, 512), ("avg",)], 512 * 6 * 6),
}
MODEL_NAMES = tuple(SPECS)
# Grad-CAM's layer per model: the module whose output is the last convolutional block, before the
# final pooling (explain.py). The sizes are its output for a 48x48 face: the map's resolution.
CAM_LAYER = {
    "vgg2_0_2": "features",      # the VGG prefix itself: 128 x 24 x 24 (the body only pools)
    "vgg2_2_2": "body.2",        # cbp 256 -> 512: 512 x 12 x 12
    "vgg2_4_2_conv3": "body.4",  # cbp 256 -> 512: 512 x 12 x 12
    "vgg2_4_2_conv5": "body.4",  # cbp 256 -> 512: 512 x 6 x 6
    "vgg2_4_ilrb_2": "body.4",   # inverted residual 256 -> 512: 512 x 12 x 12
}


class _SharedSlopePReLU(torch.autograd.Function):
    """PReLU with one slope, with a backward built from fast CPU kernels.

    On CPUs, torch's `_prelu_kernel_backward` runs 10-15x slower than `leaky_relu_backward` over
    the same tensor (161 ms against 10 ms for a 64x1024x24x24 bf16 activation on the dev machine):
    it was a quarter to a third of a vgg2_4_ilrb_2 training step. The input gradient is exactly
    leaky ReLU's with the current slope; the slope's gradient is sum(grad * min(x, 0))."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.prelu(x, weight.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.to(x.dtype)  # autocast may have run the forward in bf16 on an fp32 x
        slope = weight.to(x.dtype).item()  # the slope as the forward used it (bf16 under autocast)
        grad_x = torch.ops.aten.leaky_relu_backward(grad, x, slope, False)
        grad_weight = (grad * x.clamp(max=0)).sum(dtype=torch.float32).reshape(weight.shape)
        return grad_x, grad_weight.to(weight.dtype)


class PReLU(nn.PReLU):
    """nn.PReLU (same parameter, same checkpoints) whose backward is fast on CPUs; elsewhere, and
    under torch.compile, torch's own kernel (it is fast on GPUs, where `.item()` would stall)."""

    def forward(self, x):
        if (x.device.type == "cpu" and self.weight.numel() == 1 and torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            return _SharedSlopePReLU.apply(x, self.weight)
        return super().forward(x)


def cbp(cin, cout, kernel, padding, groups=1):
    """Conv (no bias: BN follows) + BatchNorm + PReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=padding, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), PReLU())


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, linear 1x1 project, skip when shapes match."""

    def __init__(self, cin, expanded, cout):
        super().__init__()
        self.block = nn.Sequential(
            cbp(cin, expanded, 1, 0),
            cbp(expanded, expanded, 3, 1, groups=expanded),
            nn.Conv2d(expanded, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = cin == cout

    def forward(self, x):
        out = self.block(x)
        return x + out if self.residual else out


def vgg11_bn_prefix():
    """`vgg11_bn().features[:7]` with the same module indices (0..6) as torchvision's."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(inplace=True))


def make_layer(spec):
    kind, *sizes = spec
    if kind == "cbp":
        return cbp(*sizes)
    if kind == "irb":
        return InvertedResidual(*sizes)
    if kind == "max":
        return nn.MaxPool2d(2)
    if kind == "avg":
        return nn.AvgPool2d(2)
    if kind == "adaptive":
        return nn.AdaptiveAvgPool2d(sizes[0])
    raise ValueError(f"unknown layer kind {kind!r}")


class FerNet(nn.Module):
    """Grey 48x48 faces in [0, 1], shape (N, 1, H, W) -> logits (N, len(class_names)).

    The input normalisation lives in the model (as buffers saved with it), so a checkpoint
    carries the statistics it was trained with and inference cannot get them wrong. The class
    names (FER2013's seven, or a folder's classes) are saved beside the weights (checkpoint.py).
    """

    def __init__(self, name, mean=PLAIN_MEAN, std=PLAIN_STD, class_names=EMOTIONS):
        super().__init__()
        body, features = SPECS[name]
        self.name = name
        self.class_names = tuple(class_names)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.features = vgg11_bn_prefix()
        self.body = nn.Sequential(*[make_layer(spec) for spec in body])
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(features, 512), PReLU(), nn.Dropout(0.5),
            nn.Linear(512, len(self.class_names)))

    def forward(self, x):
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std  # grey replicated to 3 channels
        return self.classifier(self.body(self.features(x)))


def imagenet_prefix_state():
    """The VGG11-BN ImageNet weights of the prefix, from the torch hub cache or a download.

    Raises OSError-like errors when they cannot be had (offline and not cached)."""
    from torchvision.models import VGG11_BN_Weights
    weights = VGG11_BN_Weights.IMAGENET1K_V1
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.exists(cached):  # say what a download costs before it starts
        print(f"downloading the VGG11-BN ImageNet weights ({weights.meta['_file_size']:.0f} MB, once, "
              f"into {os.path.dirname(cached)}; the model uses their first 7 layers; Ctrl-C and "
              "--pretrained no start from random weights instead)", file=sys.stderr)
    state = weights.get_state_dict(progress=not os.path.exists(cached))
    prefix = {k[len("features."):]: v for k, v in state.items()
              if k.startswith("features.") and int(k.split(".")[1]) < 7}
    return prefix


def fit_classes(model, class_names):
    """Give a trained model a head for `class_names` (fine-tuning on a folder's classes): the head
    stays as it is when the classes are the model's; otherwise its last layer is replaced, and
    the rows of the classes both share are copied into the new one, so they start where they were.
    Returns a sentence that says what was done, or None when nothing was."""
    old, new = list(model.class_names), list(class_names)
    if old == new:
        return None
    layer = model.classifier[-1]
    head = nn.Linear(layer.in_features, len(new)).to(layer.weight.device)
    shared = [name for name in new if name in old]
    with torch.no_grad():
        for name in shared:
            head.weight[new.index(name)] = layer.weight[old.index(name)]
            head.bias[new.index(name)] = layer.bias[old.index(name)]
    model.classifier[-1], model.class_names = head, tuple(new)
    kept = f"; the rows of {', '.join(shared)} were copied from it" if shared else ""
    return (f"the model's classes ({', '.join(old)}) are not the data's ({', '.join(new)}): its "
            f"last layer was replaced by a new one for {len(new)} classes{kept}")


def build_model(name, pretrained="no", class_names=EMOTIONS):
    """Build a model by name, with one output per class. pretrained: 'yes' | 'no' | 'auto'.

    Returns (model, used_imagenet_weights). 'auto' falls back to random initialisation with one
    clear warning when the ImageNet weights cannot be had; 'yes' raises UserError instead."""
    if name not in SPECS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if pretrained == "no":
        return FerNet(name, class_names=class_names), False
    try:
        prefix = imagenet_prefix_state()
    except Exception as err:  # no network, no cache, corrupt file: all mean "not available"
        why = f"ImageNet weights for VGG11-BN could not be loaded ({type(err).__name__}: {err})"
        if pretrained == "yes":
            raise UserError(f"{why}. Put vgg11_bn-6002323d.pth under $TORCH_HOME/hub/checkpoints/ "
                            "(default ~/.cache/torch), or use --pretrained no.") from err
        print(f"warning: {why}; starting from random initialisation (--pretrained auto).",
              file=sys.stderr)
        return FerNet(name, class_names=class_names), False
    model = FerNet(name, IMAGENET_MEAN, IMAGENET_STD, class_names)
    try:
        model.features.load_state_dict(prefix)
    except RuntimeError as err:
        raise UserError(f"the cached VGG11-BN weights do not fit the model: {err}") from err
    return model, True


def gflops_per_image(model):
    """Forward GFLOP for one 48x48 image, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    with counter, torch.no_grad():
        model(torch.zeros(1, 1, SIDE, SIDE))
    model.train(was_training)
    return counter.get_total_flops() / 1e9


def summary_table():
    rows = ["| model | parameters | GFLOP/image | output |", "|---|---:|---:|---|"]
    for name in MODEL_NAMES:
        model = FerNet(name)
        params = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            classes = model.eval()(torch.zeros(2, 1, SIDE, SIDE)).shape[1]
        rows.append(f"| {name} | {params:,} | {gflops_per_image(model):.2f} | (N, {classes}) |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(summary_table())
