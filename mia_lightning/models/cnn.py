"""A small CNN for small images (digits 1x8x8, CIFAR 3x32x32): quick to train on a CPU, easy to audit."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from mia_lightning.models import register_model


def norm_layer(kind: str, channels: int) -> nn.Module:
    """``batch`` | ``group`` | ``none``: GroupNorm is the DP-compatible choice (per-example independent)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; use 'batch', 'group' or 'none'")


@register_model("cnn")
def cnn(
    num_classes: int,
    input_shape: tuple[int, ...],
    channels: Sequence[int] = (32, 64),
    hidden: int = 128,
    norm: str = "none",
    dropout: float = 0.0,
) -> nn.Module:
    """``conv{i} -> norm{i} -> act{i} -> pool{i}`` blocks, then ``fc1`` (hidden) and ``fc2`` (classifier)."""
    if len(input_shape) != 3:
        raise ValueError(f"cnn needs image inputs (C, H, W), got input_shape {input_shape}")
    c, h, w = input_shape
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, out_c in enumerate(channels, start=1):
        layers[f"conv{i}"] = nn.Conv2d(c, out_c, kernel_size=3, padding=1)
        layers[f"norm{i}"] = norm_layer(norm, out_c)
        layers[f"act{i}"] = nn.ReLU()
        if h >= 2 and w >= 2:
            layers[f"pool{i}"] = nn.MaxPool2d(2)
            h, w = h // 2, w // 2
        c = out_c
    layers["flatten"] = nn.Flatten()
    layers["fc1"] = nn.Linear(c * h * w, hidden)
    layers["act_fc1"] = nn.ReLU()
    if dropout > 0:
        layers["drop_fc1"] = nn.Dropout(dropout)
    layers["fc2"] = nn.Linear(hidden, num_classes)
    return nn.Sequential(layers)
