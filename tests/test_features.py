"""White-box feature extraction against a naive loop of single-example backward passes, in float64."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from decimal import Decimal, localcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mia_lightning.features import FeatureSet, FeatureSpec, extract_whitebox_features, per_example_loss
from mia_lightning.models import build_model

TOL = {"rtol": 1e-10, "atol": 1e-12}


def fc_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = OrderedDict(
        fc1=nn.Linear(6, 8),
        act1=nn.ReLU(),
        drop1=nn.Dropout(0.5),
        fc2=nn.Linear(8, 5),
        act2=nn.Tanh(),
        fc3=nn.Linear(5, 4),
    )
    return nn.Sequential(layers).double()


def cnn_model(seed: int = 0) -> nn.Sequential:
    """Stride, dilation, reflect and 'same' padding, and an in-place ReLU right after a tapped conv."""
    torch.manual_seed(seed)
    layers = OrderedDict(
        conv1=nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        act1=nn.ReLU(inplace=True),
        conv2=nn.Conv2d(3, 4, 3, stride=2),
        act2=nn.ReLU(),
        conv3=nn.Conv2d(4, 2, 2, dilation=2, padding="same", bias=False),
        flatten=nn.Flatten(),
        fc1=nn.Linear(2 * 3 * 3, 6),
        act3=nn.ReLU(inplace=True),
        fc2=nn.Linear(6, 3),
    )
    return nn.Sequential(layers).double()


def batchnorm_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = OrderedDict(
        conv1=nn.Conv2d(1, 3, 3),
        bn1=nn.BatchNorm2d(3),
        act1=nn.ReLU(),
        flatten=nn.Flatten(),
        fc1=nn.Linear(3 * 4 * 4, 5),
        bn2=nn.BatchNorm1d(5),
        act2=nn.ReLU(),
        fc2=nn.Linear(5, 3),
    )
    model = nn.Sequential(layers).double()
    with torch.no_grad():  # non-trivial running statistics, so eval mode is not the identity
        for _ in range(3):
            model(torch.randn(16, 1, 6, 6, dtype=torch.float64) * 3 + 1)
    return model


def records(
    n: int, shape: tuple[int, ...], num_classes: int, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=generator, dtype=torch.float64)
    return x, torch.randint(0, num_classes, (n,), generator=generator)


def naive_features(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: FeatureSpec
) -> dict[str, torch.Tensor]:
    """The obvious way: one example at a time, forward, loss.backward(), read param.grad.

    The error of a Linear layer is read from its bias gradient, the activation is the layer's input.
    """
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    modules = dict(model.named_modules())
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in {*spec.outputs, *spec.gradients} - {"output", "log_output"}:
        modules[name].register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(
                name, (args[0].detach().clone(), out.detach().clone())
            )
        )
    rows: dict[str, list[torch.Tensor]] = {}
    for i in range(len(x)):
        model.zero_grad()
        logits = model(x[i : i + 1])
        loss = F.cross_entropy(logits, y[i : i + 1])
        loss.backward()
        example = {"loss": loss.detach().reshape(1), "label": F.one_hot(y[i], logits.shape[1]).double()}
        for name in spec.outputs:
            if name == "output":
                output = torch.softmax(logits.detach(), 1)
            elif name == "log_output":
                output = torch.log_softmax(logits.detach(), 1)
            else:
                output = seen[name][1]
            example[f"output/{name}"] = output.flatten()
        for name in spec.gradients:
            layer = modules[name]
            weight_grad = layer.weight.grad.reshape(layer.weight.shape[0], -1).T.clone()  # (rows, out)
            if isinstance(layer, nn.Linear) and spec.factorise_linear:
                example[f"grad/{name}/activation"] = seen[name][0].flatten()
                example[f"grad/{name}/error"] = layer.bias.grad.clone()
                example[f"check/{name}"] = weight_grad
            else:
                example[f"grad/{name}"] = weight_grad
        for key, value in example.items():
            rows.setdefault(key, []).append(value)
    return {key: torch.stack(values) for key, values in rows.items()}


def assert_matches_naive(features: FeatureSet, naive: dict[str, torch.Tensor], t: int = 0) -> None:
    for key, expected in naive.items():
        if key.startswith("check/"):
            layer = key.removeprefix("check/")
            activation = features[f"grad/{layer}/activation"][:, t]
            error = features[f"grad/{layer}/error"][:, t]
            torch.testing.assert_close(activation[:, :, None] * error[:, None, :], expected, **TOL)
            torch.testing.assert_close(
                features.gradient_norm(layer)[:, t], expected.flatten(1).norm(dim=1), **TOL
            )
        elif key == "label":
            torch.testing.assert_close(features[key], expected, **TOL)
        else:
            torch.testing.assert_close(features[key][:, t], expected, **TOL, msg=key)
            if key.startswith("grad/") and key.count("/") == 1:
                norm = expected.flatten(1).norm(dim=1)
                torch.testing.assert_close(
                    features.gradient_norm(key.removeprefix("grad/"))[:, t], norm, **TOL
                )


def hooks_left(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )


@pytest.mark.parametrize("factorise_linear", [True, False])
def test_fc_all_layers_match_naive_loop(factorise_linear):
    model = fc_model().train()
    x, y = records(21, (6,), 4)
    names = [name for name, _ in model.named_children()]
    spec = FeatureSpec(
        outputs=("output", "log_output", *names),
        gradients=("fc1", "fc2", "fc3"),
        factorise_linear=factorise_linear,
    )
    features = extract_whitebox_features(model, (x, y), spec, chunk_size=8)

    assert len(features) == 21
    assert features["output/fc2"].shape == (21, 1, 5)
    assert features["loss"].shape == (21, 1, 1)
    assert features["target"].dtype == torch.int64 and torch.equal(features["target"], y)
    if factorise_linear:
        assert features["grad/fc2/activation"].shape == (21, 1, 8)
        assert features["grad/fc2/error"].shape == (21, 1, 5)
    else:
        assert features["grad/fc2"].shape == (21, 1, 8, 5)
    assert_matches_naive(features, naive_features(model, x, y, spec))
    # Dropout was off during extraction (the naive loop runs in eval mode) and the model is as it was.
    assert model.training and all(m.training for m in model.modules())
    assert hooks_left(model) == 0
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_cnn_conv_and_linear_gradients_match_naive_loop():
    model = cnn_model()
    x, y = records(13, (2, 7, 7), 3)
    spec = FeatureSpec(
        outputs=("output", "conv1", "act1", "conv3"), gradients=("conv1", "conv2", "conv3", "fc1", "fc2")
    )
    features = extract_whitebox_features(model, (x, y), spec, chunk_size=5)

    assert features["grad/conv2"].shape == (13, 1, 3 * 3 * 3, 4)
    assert features["grad/conv3"].shape == (13, 1, 4 * 2 * 2, 2)
    assert_matches_naive(features, naive_features(model, x, y, spec))


def test_registered_cnn_with_batchnorm_matches_naive_loop():
    torch.manual_seed(0)
    model = build_model("cnn", num_classes=4, input_shape=(1, 8, 8), channels=(3, 4), hidden=6, norm="batch")
    model = model.double()
    with torch.no_grad():
        model(torch.randn(32, 1, 8, 8, dtype=torch.float64) + 0.5)
    x, y = records(9, (1, 8, 8), 4)
    spec = FeatureSpec(outputs=("output", "norm1", "fc1"), gradients=("conv1", "conv2", "fc1", "fc2"))
    features = extract_whitebox_features(model.train(), (x, y), spec, chunk_size=4)
    assert_matches_naive(features, naive_features(model, x, y, spec))
    assert model.training


def test_batchnorm_in_eval_mode_matches_naive_loop_whatever_the_chunking():
    model = batchnorm_model()
    x, y = records(20, (1, 6, 6), 3)
    spec = FeatureSpec(outputs=("output", "bn1", "bn2"), gradients=("conv1", "fc1", "fc2"))
    naive = naive_features(model, x, y, spec)
    for chunk_size in (1, 7, 64):
        assert_matches_naive(extract_whitebox_features(model, (x, y), spec, chunk_size=chunk_size), naive)


def test_linear_on_sequences_sums_outer_products_over_positions():
    torch.manual_seed(0)
    layers = OrderedDict(fc1=nn.Linear(3, 4), act1=nn.Tanh(), flatten=nn.Flatten(), fc2=nn.Linear(5 * 4, 2))
    model = nn.Sequential(layers).double()
    x, y = records(6, (5, 3), 2)
    spec = FeatureSpec(outputs=("fc1",), gradients=("fc1", "fc2"), factorise_linear=False)
    features = extract_whitebox_features(model, (x, y), spec)
    assert features["grad/fc1"].shape == (6, 1, 3, 4)
    assert_matches_naive(features, naive_features(model, x, y, spec))
    with pytest.raises(ValueError, match="use factorise_linear=False"):
        extract_whitebox_features(model, (x, y), FeatureSpec(gradients=("fc1",)))


def decimal_log_softmax(row: list[float]) -> list[Decimal]:
    """log p_j to 60 digits: the slow obvious reference where float64 rounds 1 - p_y to 0."""
    with localcontext() as context:
        context.prec = 60
        logits = [Decimal(v) for v in row]
        log_sum = sum((z.exp() for z in logits), Decimal(0)).ln()
        return [z - log_sum for z in logits]


def test_loss_log_output_and_errors_stay_exact_for_confident_predictions():
    # Logit margins 1, 45, 85 and 0: F.cross_entropy gives 0 loss and 0 error for the two confident rows.
    logits = torch.tensor([[0.0, 1.0, -2.0], [45.0, 0.0, 3.0], [0.0, 85.0, -5.0], [2.0, 2.0, 2.0]])
    targets = torch.tensor([1, 0, 1, 2])
    identity = nn.Linear(3, 3).double()
    with torch.no_grad():
        identity.weight.copy_(torch.eye(3))
        identity.bias.zero_()
    model = nn.Sequential(OrderedDict(fc1=identity))
    spec = FeatureSpec(outputs=("log_output",), gradients=("fc1",))
    features = extract_whitebox_features(model, (logits.double(), targets), spec)
    loss = per_example_loss(logits.double(), targets)

    for i, row in enumerate(logits.tolist()):
        log_p = decimal_log_softmax(row)
        y = int(targets[i])
        assert loss[i].item() == pytest.approx(float(-log_p[y]), rel=1e-13, abs=0)
        assert features["loss"][i, 0, 0].item() == pytest.approx(float(-log_p[y]), rel=1e-13, abs=0)
        for j in range(3):
            assert features["output/log_output"][i, 0, j].item() == pytest.approx(float(log_p[j]), rel=1e-13)
            with localcontext() as context:
                context.prec = 60
                error = log_p[j].exp() - (1 if j == y else 0)  # dL/dz_j = p_j - [j == y]
            assert features["grad/fc1/error"][i, 0, j].item() == pytest.approx(float(error), rel=1e-12, abs=0)
    assert loss[1].item() > 0 and F.cross_entropy(logits.double()[1:2], targets[1:2]).item() == 0


def test_frozen_layers_get_gradients_and_stay_frozen():
    model = fc_model()
    frozen = copy.deepcopy(model)
    for p in [*frozen.fc1.parameters(), *frozen.fc2.parameters()]:
        p.requires_grad_(False)
    x, y = records(10, (6,), 4)
    spec = FeatureSpec(gradients=("fc1", "fc2", "fc3"))
    expected = extract_whitebox_features(model, (x, y), spec)
    got = extract_whitebox_features(frozen, (x, y), spec)
    for name in expected.names:
        torch.testing.assert_close(got[name], expected[name], **TOL)
    assert [p.requires_grad for p in frozen.parameters()] == [False] * 4 + [True] * 2


def test_snapshots_are_stacked_along_the_time_axis():
    models = [fc_model(seed) for seed in (0, 1, 2)]
    x, y = records(11, (6,), 4)
    spec = FeatureSpec(outputs=("output", "act1"), gradients=("fc2",))
    stacked = extract_whitebox_features(models, (x, y), spec, chunk_size=4)

    assert stacked["output/act1"].shape == (11, 3, 8)
    assert stacked["grad/fc2/error"].shape == (11, 3, 5)
    assert stacked["label"].shape == (11, 4) and stacked["target"].shape == (11,)
    for t, model in enumerate(models):
        alone = extract_whitebox_features(model, (x, y), spec)
        for name in alone.names:
            if name in ("label", "target"):
                assert torch.equal(stacked[name], alone[name])
            else:
                assert torch.equal(stacked[name][:, t], alone[name][:, 0])
        assert_matches_naive(stacked, naive_features(model, x, y, spec), t=t)
    assert not torch.allclose(stacked["loss"][:, 0], stacked["loss"][:, 1])
    assert not torch.allclose(stacked["grad/fc2/error"][:, 1], stacked["grad/fc2/error"][:, 2])


def test_out_dir_mode_equals_in_memory_mode(tmp_path):
    models = [cnn_model(0), cnn_model(1)]
    x, y = records(23, (2, 7, 7), 3)
    spec = FeatureSpec(outputs=("output", "act2"), gradients=("conv2", "fc1"))
    in_memory = extract_whitebox_features(models, (x, y), spec, chunk_size=4)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)  # the same chunks: results equal bit for bit
    on_disk = extract_whitebox_features(
        models, loader, spec, chunk_size=4, out_dir=tmp_path / "features", progress=True
    )

    assert on_disk.names == in_memory.names
    for name in in_memory.names:
        assert torch.equal(on_disk[name], in_memory[name]), name
        assert on_disk[name].dtype == in_memory[name].dtype
    rows = on_disk.index(torch.tensor([3, 0, 22]))
    assert torch.equal(rows["grad/conv2"], in_memory["grad/conv2"][[3, 0, 22]])
    eager = FeatureSet.load(tmp_path / "features", mmap=False)
    assert torch.equal(eager["output/act2"], in_memory["output/act2"])
    with pytest.raises(ValueError, match="already holds a FeatureSet"):
        extract_whitebox_features(models, (x, y), spec, out_dir=tmp_path / "features")


def test_feature_set_save_and_load_roundtrip(tmp_path):
    x, y = records(7, (6,), 4)
    features = extract_whitebox_features(
        fc_model(), (x, y), FeatureSpec(gradients=("fc3",), factorise_linear=False)
    )
    features.save(tmp_path / "saved")
    loaded = FeatureSet.load(tmp_path / "saved")
    for name in features.names:
        assert torch.equal(loaded[name], features[name])
    loaded["loss"][0] = 123.0  # copy-on-write: the file is untouched
    assert torch.equal(FeatureSet.load(tmp_path / "saved")["loss"], features["loss"])
    with pytest.raises(FileNotFoundError, match="features.json"):
        FeatureSet.load(tmp_path / "nowhere")
    with pytest.raises(KeyError, match="layers with gradients"):
        features.gradient_norm("fc1")


def margin_model(margins: list[float]) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float32 Linear whose logits are (m, 0, 0) for input m, and those inputs labelled 0."""
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(1, 3)))
    with torch.no_grad():
        model.fc1.weight.copy_(torch.tensor([[1.0], [0.0], [0.0]]))
        model.fc1.bias.zero_()
    return model, torch.tensor(margins).reshape(-1, 1), torch.zeros(len(margins), dtype=torch.long)


def test_loss_of_confident_predictions_keeps_its_value_and_order():
    margins = [10.0, 30.0, 40.0, 80.0]
    model, x, y = margin_model(margins)
    spec = FeatureSpec(outputs=("output", "log_output"), gradients=("fc1",))
    features = extract_whitebox_features(model, (x, y), spec)
    loss = features["loss"][:, 0, 0]
    # The naive float32 cross-entropy rounds every margin past ~17 to a loss of exactly 0: a tie.
    assert F.cross_entropy(model(x), y, reduction="none")[1:].tolist() == [0.0, 0.0, 0.0]
    # The stored loss is log(1 + 2 exp(-m)), to float32 precision, so it stays ordered.
    exact = torch.tensor([math.log1p(2 * math.exp(-m)) for m in margins])
    torch.testing.assert_close(loss, exact, rtol=1e-5, atol=0.0)
    assert (loss[:-1] > loss[1:]).all()
    # The back-propagated error of the true class is -(1 - p_y) = -2 exp(-m), not a rounded 0.
    error = features["grad/fc1/error"][:, 0]
    complement = torch.tensor([2 * math.exp(-m) / (1 + 2 * math.exp(-m)) for m in margins])
    torch.testing.assert_close(error[:, 0], -complement, rtol=1e-5, atol=0.0)
    # log_output keeps -m for the other classes, where the softmax keeps only 1.0 for the true one.
    torch.testing.assert_close(features["output/log_output"][:, 0, 1], -torch.tensor(margins) - exact)
    assert features["output/output"][1:, 0, 0].tolist() == [1.0, 1.0, 1.0]


def test_per_example_loss_equals_cross_entropy_in_value_and_gradient():
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(40, 7, generator=generator, dtype=torch.float64) * 5).requires_grad_()
    targets = torch.randint(0, 7, (40,), generator=generator)
    stable = per_example_loss(logits, targets)
    naive = F.cross_entropy(logits, targets, reduction="none")
    torch.testing.assert_close(stable, naive, **TOL)
    weights = torch.rand(40, generator=generator, dtype=torch.float64)
    (stable_grad,) = torch.autograd.grad((stable * weights).sum(), logits)
    (naive_grad,) = torch.autograd.grad((naive * weights).sum(), logits)
    torch.testing.assert_close(stable_grad, naive_grad, **TOL)


def test_float32_model_gives_float32_features_close_to_float64():
    model = fc_model()
    x, y = records(12, (6,), 4)
    spec = FeatureSpec(outputs=("output", "fc2"), gradients=("fc2",), factorise_linear=False)
    exact = extract_whitebox_features(model, (x, y), spec)
    single = extract_whitebox_features(model.float(), (x.float(), y), spec)
    for name in exact.names:
        if name != "target":
            assert single[name].dtype == torch.float32
            torch.testing.assert_close(single[name], exact[name].float(), rtol=1e-4, atol=1e-5)


def test_unknown_or_wrong_type_layer_is_refused_with_valid_names():
    model = fc_model()
    with pytest.raises(
        ValueError, match=r"unknown output layer\(s\) \['fc9'\]; valid names: output, log_output, fc1, act1"
    ):
        FeatureSpec(outputs=("fc9",)).validate(model)
    with pytest.raises(
        ValueError, match=r"\['act1'\] are not nn.Linear / nn.Conv2d .* valid names: fc1, fc2, fc3"
    ):
        extract_whitebox_features(model, records(3, (6,), 4), FeatureSpec(gradients=("act1",)))
    grouped = nn.Sequential(OrderedDict(conv=nn.Conv2d(2, 2, 1, groups=2), flat=nn.Flatten()))
    with pytest.raises(ValueError, match="grouped convolutions"):
        FeatureSpec(gradients=("conv",)).validate(grouped)
    with pytest.raises(ValueError, match="more than once"):
        FeatureSpec(outputs=("fc1", "fc1"))


def test_bad_records_are_refused_before_any_work():
    model = fc_model()
    x, y = records(8, (6,), 4)
    spec = FeatureSpec()
    with pytest.raises(ValueError, match="shuffle=False"):
        extract_whitebox_features(model, DataLoader(TensorDataset(x, y), shuffle=True), spec)
    with pytest.raises(ValueError, match="drop_last"):
        extract_whitebox_features(model, DataLoader(TensorDataset(x, y), batch_size=3, drop_last=True), spec)
    with pytest.raises(ValueError, match="class indices"):
        extract_whitebox_features(model, (x, y.double()), spec)
    with pytest.raises(ValueError, match=r"class indices in \[0, 4\)"):
        extract_whitebox_features(model, (x, y + 4), spec)
    with pytest.raises(ValueError, match="no records"):
        extract_whitebox_features(model, (x[:0], y[:0]), spec)
    with pytest.raises(ValueError, match="8 records but y has 7"):
        extract_whitebox_features(model, (x, y[:7]), spec)
    with pytest.raises(ValueError, match="twice"):
        extract_whitebox_features([model, model], (x, y), spec)
    with pytest.raises(ValueError, match="chunk_size"):
        extract_whitebox_features(model, (x, y), spec, chunk_size=0)
