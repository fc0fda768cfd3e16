"""Fully connected classifiers, including the paper's Purchase100 and Texas100 models."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

from mia_lightning.models import register_model

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "elu": nn.ELU}

PURCHASE_WIDTHS = (1024, 512, 256, 128)


class FCNet(nn.Sequential):
    """``fc1, act1, [drop1], fc2, ..., fcK``: named children so feature specs can address every layer.

    Inputs of any shape are flattened, so the same model serves flat records and images.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        widths: Sequence[int] = (256, 128),
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; available: {', '.join(sorted(ACTIVATIONS))}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be positive, got {list(widths)}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        sizes = [in_features, *[int(w) for w in widths]]
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
            layers[f"fc{i}"] = nn.Linear(n_in, n_out)
            layers[f"act{i}"] = ACTIVATIONS[activation]()
            if dropout > 0:
                layers[f"drop{i}"] = nn.Dropout(dropout)
        layers[f"fc{len(sizes)}"] = nn.Linear(sizes[-1], num_classes)
        super().__init__(layers)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.flatten(1))


def _fc(num_classes: int, input_shape: tuple[int, ...], widths, activation, dropout) -> nn.Module:
    return FCNet(math.prod(input_shape), num_classes, widths, activation, dropout)


@register_model("fc")
def fc(
    num_classes: int,
    input_shape: tuple[int, ...],
    widths: Sequence[int] = (256, 128),
    activation: str = "relu",
    dropout: float = 0.0,
) -> nn.Module:
    return _fc(num_classes, input_shape, widths, activation, dropout)


@register_model("purchase_fc")
def purchase_fc(
    num_classes: int, input_shape: tuple[int, ...], activation: str = "tanh", dropout: float = 0.0
) -> nn.Module:
    """The paper's Purchase100 model: FC 600 -> 1024 -> 512 -> 256 -> 128 -> 100 (tanh, as in its tutorial)."""
    return _fc(num_classes, input_shape, PURCHASE_WIDTHS, activation, dropout)


@register_model("texas_fc")
def texas_fc(
    num_classes: int, input_shape: tuple[int, ...], activation: str = "tanh", dropout: float = 0.0
) -> nn.Module:
    """The paper's Texas100 model: FC 6170 -> 1024 -> 512 -> 256 -> 128 -> 100."""
    return _fc(num_classes, input_shape, PURCHASE_WIDTHS, activation, dropout)
