"""ResNet-18 for 32x32 images (CIFAR form: a 3x3 stem, no stem pooling), with a width knob to shrink it."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from mia_lightning.models import register_model
from mia_lightning.models.cnn import norm_layer

BLOCKS_PER_STAGE = (2, 2, 2, 2)


class BasicBlock(nn.Module):
    """``conv1, norm1, act1, conv2, norm2`` plus ``shortcut`` (identity, or 1x1 conv + norm when the shape changes),
    then ``act2`` on the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        bias = norm == "none"  # a conv followed by a norm layer needs no bias
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = norm_layer(norm, out_channels)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.norm2 = norm_layer(norm, out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias),
                    norm=norm_layer(norm, out_channels),
                )
            )
        else:
            self.shortcut = nn.Identity()
        self.act2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


@register_model("resnet18")
def resnet18(num_classes: int, input_shape: tuple[int, ...], width: int = 64, norm: str = "batch") -> nn.Module:
    """``conv1, norm1, act1, layer1..layer4`` (2 BasicBlocks each, widths w, 2w, 4w, 8w), ``pool, flatten``,
    ``classifier`` (the last Linear). ``width`` = w (64 is the standard ResNet-18); ``norm``: batch | group | none.
    """
    if len(input_shape) != 3:
        raise ValueError(f"resnet18 needs image inputs (C, H, W), got input_shape {input_shape}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    bias = norm == "none"
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=nn.Conv2d(input_shape[0], width, 3, padding=1, bias=bias),
        norm1=norm_layer(norm, width),
        act1=nn.ReLU(),
    )
    in_c = width
    for stage, num_blocks in enumerate(BLOCKS_PER_STAGE, start=1):
        out_c = width * 2 ** (stage - 1)
        blocks = []
        for b in range(num_blocks):
            stride = 2 if stage > 1 and b == 0 else 1
            blocks.append(BasicBlock(in_c, out_c, stride, norm))
            in_c = out_c
        layers[f"layer{stage}"] = nn.Sequential(*blocks)
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["classifier"] = nn.Linear(in_c, num_classes)
    return nn.Sequential(layers)
