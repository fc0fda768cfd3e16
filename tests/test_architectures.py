"""The paper's CIFAR architectures: shapes, stable names, Opacus compatibility, per-example gradients."""

import pytest
import torch
import torch.nn.functional as F
from opacus.validators import ModuleValidator
from torch import nn
from torch.func import functional_call, grad, vmap

from mia_lightning.models import build_model

# Tiny versions (fast on a CPU); every norm kind; the second name is a deep conv layer's weight for the gradient check.
TINY = {
    "alexnet": ({"channels": [8, 16, 16, 16, 16], "hidden": [32, 16]}, "conv4.weight"),
    "resnet18": ({"width": 8}, "layer4.1.conv2.weight"),
    "densenet": ({"depth": 10, "growth_rate": 4}, "block3.layer1.conv2.weight"),
}
NORMS = ("batch", "group", "none")


def tiny(arch: str, norm: str, num_classes: int = 7) -> nn.Module:
    torch.manual_seed(0)
    return build_model(arch, num_classes, (3, 32, 32), norm=norm, **TINY[arch][0])


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("arch", sorted(TINY))
def test_forward_backward_and_the_classifier_name(arch, norm):
    model = tiny(arch, norm)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 7, (4,))
    logits = model(x)
    assert logits.shape == (4, 7)
    F.cross_entropy(logits, y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    modules = dict(model.named_modules())
    assert isinstance(modules["classifier"], nn.Linear) and modules["classifier"].out_features == 7
    assert [name for name, m in modules.items() if isinstance(m, nn.Linear)][-1] == "classifier"
    kinds = {type(m) for m in model.modules()}
    assert (nn.BatchNorm2d in kinds) == (norm == "batch") and (nn.GroupNorm in kinds) == (norm == "group")


@pytest.mark.parametrize("arch", sorted(TINY))
def test_opacus_accepts_group_norm_and_flags_batch_norm(arch):
    assert ModuleValidator.validate(tiny(arch, "group"), strict=False) == []
    assert ModuleValidator.validate(tiny(arch, "batch"), strict=False) != []


@pytest.mark.parametrize("norm", ("batch", "group"))
@pytest.mark.parametrize("arch", sorted(TINY))
def test_torch_func_per_example_gradients_match_a_loop(arch, norm):
    model = tiny(arch, norm).eval()  # eval mode: BatchNorm uses running statistics, as feature extraction does
    if norm == "batch":  # non-trivial running statistics, so eval-mode BatchNorm is not the identity
        with torch.no_grad():
            model.train()(torch.randn(16, 3, 32, 32) * 2 + 1)
        model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 6])
    first_conv = next(k for k in params if k.endswith("weight") and params[k].ndim == 4)
    for name in (first_conv, TINY[arch][1]):

        def loss(weight, xi, yi, name=name):
            out = functional_call(model, {**params, name: weight}, (xi.unsqueeze(0),))
            return F.cross_entropy(out, yi.unsqueeze(0))

        fast = vmap(grad(loss), in_dims=(None, 0, 0))(params[name], x, y)
        weight = dict(model.named_parameters())[name]
        for i in range(len(x)):
            model.zero_grad()
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            torch.testing.assert_close(fast[i], weight.grad, rtol=1e-4, atol=1e-6)


def test_full_sizes_have_the_published_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # ResNet-18 (CIFAR form): 11.2M; DenseNet-BC-100 (k=12): 0.8M; both with a 100-class head.
    assert 11.1e6 < count(build_model("resnet18", 100, (3, 32, 32))) < 11.3e6
    assert 0.75e6 < count(build_model("densenet", 100, (3, 32, 32))) < 0.85e6
    alexnet = build_model("alexnet", 100, (3, 32, 32))
    assert [n for n, m in alexnet.named_modules() if isinstance(m, nn.Conv2d)] == [f"conv{i}" for i in range(1, 6)]
    assert [n for n, m in alexnet.named_modules() if isinstance(m, nn.Linear)] == ["fc1", "fc2", "classifier"]
    assert alexnet(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize(
    "arch, kwargs, message",
    [
        ("alexnet", {"channels": [8, 8, 8, 8]}, "needs 5 positive conv widths"),
        ("alexnet", {"input_shape": (3, 16, 16)}, "at least 32x32"),
        ("alexnet", {"dropout": 1.0}, "dropout must be in"),
        ("resnet18", {"width": 0}, "width must be >= 1"),
        ("densenet", {"depth": 11}, "depth must be 6n \\+ 4"),
        ("densenet", {"growth_rate": 0}, "growth_rate must be >= 1"),
        ("densenet", {"compression": 0.0}, "compression must be in"),
        ("resnet18", {"norm": "layer"}, "unknown norm 'layer'"),
        ("densenet", {"input_shape": (600,)}, "needs image inputs"),
    ],
)
def test_bad_arguments_are_refused(arch, kwargs, message):
    kwargs = {"input_shape": (3, 32, 32), **kwargs}
    with pytest.raises(ValueError, match=message):
        build_model(arch, 10, kwargs.pop("input_shape"), **kwargs)


def test_group_norm_fits_any_channel_count():
    """GroupNorm groups divide the channels (gcd with 32), so DenseNet-BC's 24 + 12i channels build under DP."""
    from opacus.validators import ModuleValidator

    from mia_lightning.models import build_model

    assert ModuleValidator.validate(build_model("densenet", 100, (3, 32, 32), norm="group"), strict=False) == []
    assert ModuleValidator.validate(build_model("resnet18", 10, (3, 32, 32), norm="group", width=24),
                                    strict=False) == []
