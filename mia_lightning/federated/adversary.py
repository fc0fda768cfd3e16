"""The attacker settings of the paper's federated experiments (Table X) and the active attacks they run.

A setting is a position (``global``: the server, sees every upload; ``local``: one participant, sees only the
aggregates) and a mode: passive, gradient ascent, isolating (server only), or isolating + ascent.
- Gradient ascent: before sharing, the attacker moves the parameters UP the loss gradient of the records it
  attacks, W <- W + gamma * dL/dW (``ascent: mean``, the default), or up the average of each record's own
  gradient scaled to unit length (``ascent: per_record``; see :func:`gradient_ascent_step`). A member's owner
  then pushes its loss back down sharply in local training; a non-member's loss stays raised. The server does
  it to what it sends the target participant (the others get the honest aggregate, so the federation stays
  useful and the attack is not visible to them); a local attacker does it to what it uploads, which then
  reaches everyone through the average.
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
ASCENTS = ("mean", "per_record")
_ASCENT_CHUNK = 64  # records per vectorised per-record gradient: bounds memory to 64 copies of the parameters


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


def gradient_ascent_step(model: nn.Module, x: Tensor, y: Tensor, gamma: float, ascent: str = "mean") -> None:
    """Move ``model`` up the cross-entropy of the records (x, y), in place, computed in eval mode.

    ``mean`` (the default, the paper's step): W <- W + gamma * dL/dW, L the records' mean loss. Its gradient is
    carried by the records the model gets wrong; those it already fits hardly move. ``per_record``:
    W <- W + gamma * mean_i g_i / |g_i|, g_i record i's own gradient: every attacked record is pushed equally and
    gamma bounds the step's length (measured against the mean step in benchmarks/README.md). Eval mode: the step
    is the attacker's deliberate edit, not a dropout sample of it.
    """
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if ascent not in ASCENTS:
        raise ValueError(f"unknown ascent {ascent!r}; valid: {', '.join(ASCENTS)}")
    was_training = model.training
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    try:
        model.eval()
        with torch.enable_grad():
            if ascent == "mean":
                grads = torch.autograd.grad(F.cross_entropy(model(x), y), [params[n] for n in names])
            else:
                grads = _mean_unit_record_gradient(model, names, x, y)
    finally:
        model.train(was_training)
    with torch.no_grad():
        for name, grad in zip(names, grads):
            params[name].add_(grad, alpha=gamma)


def _mean_unit_record_gradient(model: nn.Module, names: list[str], x: Tensor, y: Tensor) -> list[Tensor]:
    """mean_i g_i / |g_i| over the records, g_i each record's loss gradient (vmap over chunks of records)."""
    from torch.func import functional_call, grad, vmap

    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    buffers = dict(model.named_buffers())

    def record_loss(trainable: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        logits = functional_call(model, ({**frozen, **trainable}, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(logits, yi.unsqueeze(0))

    per_record = vmap(grad(record_loss), in_dims=(None, 0, 0))
    trainable = {n: p.detach() for n, p in model.named_parameters() if n in names}
    total = {n: torch.zeros_like(p) for n, p in trainable.items()}
    for start in range(0, len(y), _ASCENT_CHUNK):
        grads = per_record(trainable, x[start : start + _ASCENT_CHUNK], y[start : start + _ASCENT_CHUNK])
        norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values())).clamp_min(1e-12)
        for n, g in grads.items():
            total[n] += torch.einsum("r,r...->...", 1.0 / norms, g)
    return [total[n] / len(y) for n in names]


class ActiveAttacker(Tampering):
    """Tampering by one active setting: ``network`` is a scratch copy of the architecture the ascent runs on,
    ``(x, y)`` the records whose loss it raises."""

    def __init__(self, setting: AttackSetting, network: nn.Module, x: Tensor, y: Tensor, gamma: float,
                 target_participant: int, local_attacker: int, ascent: str = "mean") -> None:
        if not setting.active:
            raise ValueError(f"setting {setting.name!r} is passive: it does not tamper with training")
        if not gamma >= 0:
            raise ValueError(f"attacker.gamma must be >= 0, got {gamma}")
        self.setting = setting
        self.network = network
        self.x, self.y = x, y
        if ascent not in ASCENTS:
            raise ValueError(f"unknown attacker.ascent {ascent!r}; valid: {', '.join(ASCENTS)}")
        self.gamma = gamma
        self.ascent = ascent
        self.target_participant = target_participant
        self.local_attacker = local_attacker
        self.isolated = target_participant if setting.isolating else None
        self._last: tuple[StateDict, StateDict] | None = None

    def ascend(self, state: StateDict) -> StateDict:
        if self._last is not None and self._last[0] is state:  # the one aggregate the server sends to everyone
            return self._last[1]
        self.network.load_state_dict(state)
        gradient_ascent_step(self.network, self.x, self.y, self.gamma, self.ascent)
        self._last = (state, clean_state_dict(self.network))
        return self._last[1]

    def sent(self, state: StateDict, participant: int) -> StateDict:
        global_ascent = self.setting.position == "global" and self.setting.ascent
        return self.ascend(state) if global_ascent and participant == self.target_participant else state

    def uploaded(self, state: StateDict, participant: int) -> StateDict:
        local_ascent = self.setting.position == "local" and self.setting.ascent and participant == self.local_attacker
        return self.ascend(state) if local_ascent else state
