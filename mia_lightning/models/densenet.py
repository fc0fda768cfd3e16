"""DenseNet-BC for 32x32 images (CIFAR form: three dense blocks, bottleneck layers, compressing transitions)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from mia_lightning.models import register_model
from mia_lightning.models.cnn import norm_layer


class DenseLayer(nn.Module):
    """``norm1, act1, conv1`` (1x1 bottleneck to 4k) then ``norm2, act2, conv2`` (3x3 to k); output = [input, new]."""

    def __init__(self, in_channels: int, growth_rate: int, norm: str) -> None:
        super().__init__()
        bottleneck = 4 * growth_rate
        self.norm1 = norm_layer(norm, in_channels)
        self.act1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, bottleneck, 1, bias=False)
        self.norm2 = norm_layer(norm, bottleneck)
        self.act2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bottleneck, growth_rate, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.act1(self.norm1(x)))
        out = self.conv2(self.act2(self.norm2(out)))
        return torch.cat([x, out], dim=1)


def _transition(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            norm=norm_layer(norm, in_channels),
            act=nn.ReLU(),
            conv=nn.Conv2d(in_channels, out_channels, 1, bias=False),
            pool=nn.AvgPool2d(2),
        )
    )


@register_model("densenet")
def densenet(
    num_classes: int,
    input_shape: tuple[int, ...],
    depth: int = 100,
    growth_rate: int = 12,
    compression: float = 0.5,
    norm: str = "batch",
) -> nn.Module:
    """``conv0, block1, transition1, block2, transition2, block3, norm, act, pool, flatten, classifier``.

    The last Linear is named ``classifier``. ``depth`` = 6n + 4 gives n bottleneck layers (``layer1..layerN``) per
    block; the defaults are DenseNet-BC-100 with k = 12 (0.8M parameters). ``norm``: batch | group | none.
    """
    if len(input_shape) != 3:
        raise ValueError(f"densenet needs image inputs (C, H, W), got input_shape {input_shape}")
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"densenet depth must be 6n + 4 with n >= 1 (10, 16, ..., 100, ...), got {depth}")
    if growth_rate < 1:
        raise ValueError(f"growth_rate must be >= 1, got {growth_rate}")
    if not 0.0 < compression <= 1.0:
        raise ValueError(f"compression must be in (0, 1], got {compression}")
    layers_per_block = (depth - 4) // 6
    channels = 2 * growth_rate
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv0=nn.Conv2d(input_shape[0], channels, 3, padding=1, bias=False)
    )
    for block in range(1, 4):
        dense: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(1, layers_per_block + 1):
            dense[f"layer{i}"] = DenseLayer(channels, growth_rate, norm)
            channels += growth_rate
        layers[f"block{block}"] = nn.Sequential(dense)
        if block < 3:
            out_channels = max(1, int(channels * compression))
            layers[f"transition{block}"] = _transition(channels, out_channels, norm)
            channels = out_channels
    layers["norm"] = norm_layer(norm, channels)
    layers["act"] = nn.ReLU()
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["classifier"] = nn.Linear(channels, num_classes)
    return nn.Sequential(layers)
