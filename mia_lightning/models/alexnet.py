"""AlexNet for 32x32 images (CIFAR), the paper's most-leaking CIFAR-100 target: 5 conv layers + 3 FC layers."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from mia_lightning.models import register_model
from mia_lightning.models.cnn import norm_layer

# (kernel, stride, padding) of conv1..conv5, and which of them are followed by a 2x2 max-pool: AlexNet's geometry
# scaled to 32x32 inputs (32 -> 8 -> 4 -> 4 -> 2 -> 2 -> 2 -> 2 -> 1), as in the usual CIFAR ports.
CONV_GEOMETRY = ((11, 4, 5), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1))
POOL_AFTER = (1, 2, 5)


@register_model("alexnet")
def alexnet(
    num_classes: int,
    input_shape: tuple[int, ...],
    channels: Sequence[int] = (64, 192, 384, 256, 256),
    hidden: Sequence[int] = (1024, 1024),
    norm: str = "none",
    dropout: float = 0.0,
) -> nn.Module:
    """``conv{i}, norm{i}, act{i}, [pool{i}]`` (i = 1..5), ``flatten``, ``fc1, act_fc1, fc2, act_fc2, classifier``.

    The last Linear is named ``classifier``. ``channels`` (5 widths) and ``hidden`` (widths of fc1, fc2) shrink it;
    ``hidden=[]`` feeds the conv features straight into the classifier. ``norm``: ``none`` (AlexNet's own),
    ``batch`` or ``group`` (for DP-SGD). ``dropout`` applies before each hidden FC layer, as in AlexNet.
    """
    if len(input_shape) != 3:
        raise ValueError(f"alexnet needs image inputs (C, H, W), got input_shape {input_shape}")
    if len(channels) != 5 or any(int(c) < 1 for c in channels):
        raise ValueError(f"alexnet needs 5 positive conv widths, got {list(channels)}")
    if any(int(w) < 1 for w in hidden):
        raise ValueError(f"hidden widths must be positive, got {list(hidden)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    c, h, w = input_shape
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, ((kernel, stride, padding), out_c) in enumerate(zip(CONV_GEOMETRY, channels), start=1):
        layers[f"conv{i}"] = nn.Conv2d(c, int(out_c), kernel, stride=stride, padding=padding)
        layers[f"norm{i}"] = norm_layer(norm, int(out_c))
        layers[f"act{i}"] = nn.ReLU()
        h, w = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
        if i in POOL_AFTER:
            layers[f"pool{i}"] = nn.MaxPool2d(2)
            h, w = h // 2, w // 2
        c = int(out_c)
    if h < 1 or w < 1:
        raise ValueError(f"alexnet needs inputs of at least 32x32 pixels, got {input_shape[1]}x{input_shape[2]}")
    layers["flatten"] = nn.Flatten()
    width = c * h * w
    for i, out_w in enumerate(hidden, start=1):
        if dropout > 0:
            layers[f"drop_fc{i}"] = nn.Dropout(dropout)
        layers[f"fc{i}"] = nn.Linear(width, int(out_w))
        layers[f"act_fc{i}"] = nn.ReLU()
        width = int(out_w)
    layers["classifier"] = nn.Linear(width, num_classes)
    return nn.Sequential(layers)
