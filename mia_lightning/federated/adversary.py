"""The attacker settings of the paper's federated experiments (Table X) and the active attacks they run.

A setting is a position (``global``: the server, sees every upload; ``local``: one participant, sees only the
aggregates) and a mode: passive, gradient ascent, isolating (server only), or isolating + ascent.
- Gradient ascent: before sharing, the attacker moves the parameters UP the loss gradient of the records it
  attacks, W <- W + gamma * dL/dW. A member's owner then pushes its loss back down sharply in local training; a
  non-member's loss stays raised. The server does it to what it sends the target participant (the others get
  the honest aggregate, so the federation stays useful and the attack is not visible to them); a local
  attacker does it to what it uploads, which then reaches everyone through the average.
- Isolating: the server sends the target participant its own model back instead of the average, so the target
  trains alone on its data and remembers it better.
Passive settings observe one honest federation; each active setting changes training and gets its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mia_lightning.federated.fedavg import StateDict, Tampering
from mia_lightning.snapshots import clean_state_dict

SETTINGS = (
    "global_passive", "global_ascent", "global_isolating", "global_isolating_ascent", "local_passive", "local_ascent",
)
MODES = {  # mode -> (ascent, isolating)
    "passive": (False, False), "ascent": (True, False), "isolating": (False, True), "isolating_ascent": (True, True),
}
PASSIVE_TRAINING = "passive"


@dataclass(frozen=True)
class AttackSetting:
    name: str
    position: str  # "global" | "local"
    ascent: bool
    isolating: bool

    @classmethod
    def parse(cls, name: str) -> AttackSetting:
        """``<position>_<mode>``; refuses unknown names (listing the valid ones) and a local attacker isolating."""
        position, _, mode = str(name).partition("_")
        if position not in ("global", "local") or mode not in MODES:
            raise ValueError(f"unknown attacker setting {name!r}; valid: {', '.join(SETTINGS)}")
        ascent, isolating = MODES[mode]
        if position == "local" and isolating:
            raise ValueError(
                f"attacker setting {name!r}: isolating is done by the server (it stops averaging the target with "
                "the others); a local attacker only sees the aggregate, so only global settings can isolate"
            )
        return cls(name, position, ascent, isolating)

    @property
    def active(self) -> bool:
        return self.ascent or self.isolating

    @property
    def training(self) -> str:
        """The federation this setting observes: passive settings share one, each active setting has its own."""
        return self.name if self.active else PASSIVE_TRAINING


def gradient_ascent_step(model: nn.Module, x: Tensor, y: Tensor, gamma: float) -> None:
    """W <- W + gamma * dL/dW in place, L the mean cross-entropy over (x, y), computed in eval mode.

    The mean keeps gamma's meaning independent of how many records are attacked. Eval mode: the step is the
    attacker's deliberate edit, not a noisy dropout sample of it.
    """
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    was_training = model.training
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        model.eval()
        with torch.enable_grad():
            grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    finally:
        model.train(was_training)
    with torch.no_grad():
        for param, grad in zip(params, grads):
            param.add_(grad, alpha=gamma)


class ActiveAttacker(Tampering):
    """Tampering by one active setting: ``network`` is a scratch copy of the architecture the ascent runs on,
    ``(x, y)`` the records whose loss it raises."""

    def __init__(self, setting: AttackSetting, network: nn.Module, x: Tensor, y: Tensor, gamma: float,
                 target_participant: int, local_attacker: int) -> None:
        if not setting.active:
            raise ValueError(f"setting {setting.name!r} is passive: it does not tamper with training")
        if not gamma >= 0:
            raise ValueError(f"attacker.gamma must be >= 0, got {gamma}")
        self.setting = setting
        self.network = network
        self.x, self.y = x, y
        self.gamma = gamma
        self.target_participant = target_participant
        self.local_attacker = local_attacker
        self.isolated = target_participant if setting.isolating else None
        self._last: tuple[StateDict, StateDict] | None = None

    def ascend(self, state: StateDict) -> StateDict:
        if self._last is not None and self._last[0] is state:  # the one aggregate the server sends to everyone
            return self._last[1]
        self.network.load_state_dict(state)
        gradient_ascent_step(self.network, self.x, self.y, self.gamma)
        self._last = (state, clean_state_dict(self.network))
        return self._last[1]

    def sent(self, state: StateDict, participant: int) -> StateDict:
        global_ascent = self.setting.position == "global" and self.setting.ascent
        return self.ascend(state) if global_ascent and participant == self.target_participant else state

    def uploaded(self, state: StateDict, participant: int) -> StateDict:
        local_ascent = self.setting.position == "local" and self.setting.ascent and participant == self.local_attacker
        return self.ascend(state) if local_ascent else state
