"""Target architectures, built by name so configs can choose them.

Every builder takes ``(num_classes, input_shape, **arch_kwargs)`` and returns a plain ``nn.Module`` mapping a batch
to logits. Module names are stable (``fc1``, ``conv1``, ...) because attack feature specs address layers by name.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ModelBuilder = Callable[..., nn.Module]
_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register ``builder`` under ``name`` so ``build_model(name, ...)`` and configs can use it."""

    def decorator(builder: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return decorator


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(arch: str, num_classes: int, input_shape: tuple[int, ...], **arch_kwargs) -> nn.Module:
    """Build the registered architecture ``arch`` for inputs of ``input_shape`` (without the batch axis)."""
    if arch not in _REGISTRY:
        raise ValueError(f"unknown architecture {arch!r}; available: {', '.join(available_models())}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return _REGISTRY[arch](num_classes=num_classes, input_shape=tuple(input_shape), **arch_kwargs)


# Importing the modules registers their architectures.
from mia_lightning.models import alexnet, cnn, densenet, fc, resnet  # noqa: E402,F401
