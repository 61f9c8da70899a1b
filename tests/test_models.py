"""The five models: exact parameter counts, shapes, gradients, ImageNet prefix weights offline."""
import os

import pytest
import torch

import models
from utils import UserError

EXPECTED_PARAMS = {"vgg2_0_2": 2_439_432, "vgg2_2_2": 10_993_418, "vgg2_4_2_conv3": 11_288_844,
                   "vgg2_4_2_conv5": 12_337_420, "vgg2_4_ilrb_2": 11_578_128}
EXPECTED_GFLOP = {"vgg2_0_2": 0.10, "vgg2_2_2": 0.79, "vgg2_4_2_conv3": 0.88,
                  "vgg2_4_2_conv5": 0.79, "vgg2_4_ilrb_2": 1.17}


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_parameter_count_shape_and_backward(name):
    torch.manual_seed(0)
    model, used = models.build_model(name, "no")
    assert not used
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name]
    assert all(p.requires_grad for p in model.parameters())
    x = torch.rand(4, 1, 48, 48)
    out = model(x)
    assert out.shape == (4, 7)
    out.logsumexp(1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # the body after the prefix sees the 128 x 24 x 24 map the issue describes
    assert model.features(x.expand(-1, 3, -1, -1)).shape == (4, 128, 24, 24)


@pytest.mark.parametrize("name", ["vgg2_0_2", "vgg2_4_ilrb_2"])
def test_forward_cost_matches_the_table(name):
    assert models.gflops_per_image(models.FerNet(name)) == pytest.approx(EXPECTED_GFLOP[name], abs=0.01)


def test_prefix_matches_torchvision_vgg11_bn_layout():
    from torchvision.models import vgg11_bn
    reference = vgg11_bn().features[:7].state_dict()
    ours = models.vgg11_bn_prefix().state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}


def test_inverted_residual_adds_input_only_when_shapes_match():
    x = torch.randn(2, 8, 6, 6)
    same = models.InvertedResidual(8, 16, 8).eval()
    assert torch.allclose(same(x), x + same.block(x))  # the skip connection is there
    grown = models.InvertedResidual(8, 16, 12).eval()
    assert grown(x).shape == (2, 12, 6, 6)
    assert torch.allclose(grown(x), grown.block(x))  # no skip when the shapes differ


def test_unknown_model_is_a_clear_error():
    with pytest.raises(UserError, match="vgg2_0_2.*vgg2_4_ilrb_2"):
        models.build_model("vgg19", "no")


def write_fake_imagenet_weights(torch_home):
    """A vgg11_bn weights file where the full one would be cached, with recognisable values."""
    from torchvision.models import VGG11_BN_Weights
    folder = os.path.join(torch_home, "hub", "checkpoints")
    os.makedirs(folder)
    state = {f"features.{k}": torch.full_like(v, 0.25) if v.is_floating_point() else v
             for k, v in models.vgg11_bn_prefix().state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # the rest of VGG is ignored
    torch.save(state, os.path.join(folder, os.path.basename(VGG11_BN_Weights.IMAGENET1K_V1.url)))


def test_imagenet_weights_load_into_the_prefix_from_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    write_fake_imagenet_weights(str(tmp_path))
    model, used = models.build_model("vgg2_2_2", "yes")
    assert used and "downloading" not in capsys.readouterr().err
    assert torch.all(model.features[0].weight == 0.25)
    assert torch.all(model.features[5].running_var == 0.25)
    assert torch.allclose(model.mean.flatten(), torch.tensor(models.IMAGENET_MEAN))
    auto_model, auto_used = models.build_model("vgg2_2_2", "auto")
    assert auto_used and torch.equal(auto_model.features[4].weight, model.features[4].weight)


def offline(monkeypatch, tmp_path):
    """No cached weights, and any download fails as it does without a network."""
    import torch.hub

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


def test_pretrained_yes_without_weights_fails_clearly(tmp_path, monkeypatch):
    offline(monkeypatch, tmp_path)
    with pytest.raises(UserError, match="--pretrained no"):
        models.build_model("vgg2_0_2", "yes")


def test_pretrained_auto_without_weights_warns_and_starts_random(tmp_path, monkeypatch, capsys):
    offline(monkeypatch, tmp_path)
    model, used = models.build_model("vgg2_0_2", "auto")
    assert not used
    err = capsys.readouterr().err
    assert "random initialisation" in err
    assert "downloading the VGG11-BN ImageNet weights (507 MB" in err  # said before trying
    assert torch.allclose(model.mean.flatten(), torch.tensor(models.PLAIN_MEAN))


def test_models_script_prints_the_table():
    table = models.summary_table()
    for name, params in EXPECTED_PARAMS.items():
        assert f"| {name} | {params:,} |" in table
    assert table.count("| (N, 7) |") == len(EXPECTED_PARAMS)


@pytest.mark.parametrize("amp", [False, True])
def test_fast_prelu_matches_torch_in_value_and_gradients(amp):
    """models.PReLU swaps torch's slow CPU backward for leaky ReLU's: same numbers, same state."""
    torch.manual_seed(0)
    # under autocast the PReLUs see the bf16 output of a convolution, BN or linear layer
    x = torch.randn(8, 16, 6, 6, dtype=torch.bfloat16 if amp else torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    x[0, 0, 0, :3] = 0  # the kink: both give the slope's gradient there
    grad = torch.randn(x.shape)
    results = []
    for module in (models.PReLU(), torch.nn.PReLU()):
        module.weight.data.fill_(0.3)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            y = module(xi)
        y.backward(grad.to(y.dtype))
        assert xi.grad.dtype == x.dtype
        results.append((y.detach(), xi.grad, module.weight.grad))
    (y, gx, gw), (y_ref, gx_ref, gw_ref) = results
    assert y.dtype == y_ref.dtype == (torch.bfloat16 if amp else torch.float32)
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)
    assert gw.dtype == gw_ref.dtype and torch.allclose(gw, gw_ref, rtol=1e-2 if amp else 1e-5)
    assert list(models.PReLU().state_dict()) == list(torch.nn.PReLU().state_dict())
