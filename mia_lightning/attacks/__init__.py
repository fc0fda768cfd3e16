"""Membership-inference attacks, built by name so the audit and configs can run any of them.

Every attack follows one protocol (``Attack``): ``feature_spec(model)`` names the features it needs,
``fit(train_members, train_nonmembers)`` learns from the attacker's known sets, ``score(features)`` returns
float64 scores (higher = member) and ``predict(features)`` hard calls. Registered names:

- ``loss``, ``confidence``, ``entropy``, ``modified_entropy``: black-box thresholds (``ThresholdAttack``)
- ``blackbox_nn``: the paper's attack network fed what a black-box attacker sees: prediction, label, loss
- ``whitebox``: prediction, loss, label and the last layer's gradient of the final model
- ``whitebox_multi_epoch``: the same features at every snapshot (needs >= 2)
- ``unsupervised``: encoder-decoder on unlabeled records + spectral clustering
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mia_lightning.attacks.base import Attack, balanced_threshold
from mia_lightning.attacks.network import AttackNetwork, ComponentInput, GradientComponent
from mia_lightning.attacks.neural import NetworkAttack
from mia_lightning.attacks.threshold import (
    ThresholdAttack,
    confidence_logit,
    log_probabilities,
    modified_entropy,
    prediction_entropy,
)
from mia_lightning.attacks.unsupervised import UnsupervisedAttack, membership_signals
from mia_lightning.attacks.whitebox import BlackboxAttack, WhiteboxAttack, WhiteboxAttackModule


@dataclass(frozen=True)
class AttackEntry:
    """A registered attack: its class and the arguments that make it this attack."""

    cls: type[Attack]
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def parameters(self) -> list[str]:
        """Keyword arguments the class accepts, through every ``__init__`` of its hierarchy."""
        names: list[str] = []
        for klass in self.cls.__mro__:
            if "__init__" not in vars(klass) or klass is object:
                continue
            for parameter in inspect.signature(klass.__init__).parameters.values():
                keyword = parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
                if keyword and parameter.name != "self" and parameter.name not in names:
                    names.append(parameter.name)
        return names


ATTACKS: dict[str, AttackEntry] = {}


def register_attack(name: str, cls: type[Attack], **defaults: Any) -> None:
    """Make ``build_attack(name, **kwargs)`` build ``cls(name=name, **defaults, **kwargs)``."""
    if name in ATTACKS:
        raise ValueError(f"attack {name!r} is already registered")
    ATTACKS[name] = AttackEntry(cls, dict(defaults))


def available_attacks() -> list[str]:
    return list(ATTACKS)


def build_attack(name: str, /, **kwargs: Any) -> Attack:
    """The attack registered as ``name``, with ``kwargs`` (e.g. ``max_epochs=50``) beside the arguments that
    define it, which cannot be overridden (``blackbox_nn`` cannot be given gradients). Results are reported
    under ``name`` unless ``kwargs`` renames it (``build_attack("whitebox", name="whitebox_fc1", ...)``).
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; available: {', '.join(ATTACKS)}")
    entry = ATTACKS[name]
    accepted = [p for p in entry.parameters() if p not in entry.defaults]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"attack {name!r} does not take {unknown}; it takes: {', '.join(accepted)}")
    return entry.cls(**{"name": name, **entry.defaults, **kwargs})


register_attack("loss", ThresholdAttack, signal="loss")
register_attack("confidence", ThresholdAttack, signal="confidence")
register_attack("entropy", ThresholdAttack, signal="entropy")
register_attack("modified_entropy", ThresholdAttack, signal="modified_entropy")
register_attack("blackbox_nn", BlackboxAttack, gradients=(), loss=True, label=True)
register_attack("whitebox", WhiteboxAttack)
register_attack("whitebox_multi_epoch", WhiteboxAttack, snapshots=None)
register_attack("unsupervised", UnsupervisedAttack)

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackEntry",
    "AttackNetwork",
    "BlackboxAttack",
    "ComponentInput",
    "GradientComponent",
    "NetworkAttack",
    "ThresholdAttack",
    "UnsupervisedAttack",
    "WhiteboxAttack",
    "WhiteboxAttackModule",
    "available_attacks",
    "balanced_threshold",
    "build_attack",
    "confidence_logit",
    "log_probabilities",
    "membership_signals",
    "modified_entropy",
    "prediction_entropy",
    "register_attack",
]
