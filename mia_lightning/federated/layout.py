"""Who holds which records in a federation, and which records each attacker knows and is evaluated on.

The split's members are dealt into equal, disjoint participant shares. Each attacker position gets four disjoint
record sets: known members and known non-members (its supervised training set) and target members and target
non-members (what it is evaluated on). The global attacker's members come from the target participant's share; the
local attacker's from the other participants' shares (never its own). Non-members come from the split's
non-members. Everything is drawn from one seed, so the same seed gives the same shares and the same attacker sets.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.base import MembershipSplit

POSITIONS = ("global", "local")
RECORD_SETS = ("known_members", "known_nonmembers", "target_members", "target_nonmembers")


@dataclass
class AttackerSizes:
    """How many records each attacker evaluates on (the paper: 100 / 100) and knows for training its attack."""

    target_members: int = 100
    target_nonmembers: int = 100
    known_members: int = 50
    known_nonmembers: int = 50

    def __post_init__(self) -> None:
        for name in RECORD_SETS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"attacker.{name} must be an int >= 2, got {value!r}")


@dataclass(frozen=True)
class AttackerRecords:
    """Dataset indices of one attacker's four pairwise-disjoint record sets."""

    known_members: np.ndarray
    known_nonmembers: np.ndarray
    target_members: np.ndarray
    target_nonmembers: np.ndarray

    def all(self) -> np.ndarray:
        """Every record the attacker scores or learns from: what an active attacker raises the loss of."""
        return np.concatenate([getattr(self, name) for name in RECORD_SETS])


@dataclass(frozen=True)
class FederatedLayout:
    shares: tuple[np.ndarray, ...]
    target_participant: int
    local_attacker: int
    attackers: dict[str, AttackerRecords]  # position -> records

    @classmethod
    def draw(cls, split: MembershipSplit, participants: int, target_participant: int, local_attacker: int,
             sizes: AttackerSizes, seed: int, positions: Sequence[str] = POSITIONS) -> FederatedLayout:
        """Deal the members into ``participants`` equal shares and draw the record sets of each attacker position.

        Refuses, before any training, a layout the split cannot hold. Each draw has its own random stream, so the
        shares and the global attacker's records do not depend on which positions are asked for.
        """
        unknown = [p for p in positions if p not in POSITIONS]
        if unknown:
            raise ValueError(f"unknown attacker position(s) {unknown}; valid: {', '.join(POSITIONS)}")
        members, nonmembers = split.members, split.nonmembers
        if isinstance(participants, bool) or not isinstance(participants, int) or participants < 1:
            raise ValueError(f"federation.participants must be a positive int, got {participants!r}")
        if participants > len(members):
            raise ValueError(
                f"federation.participants={participants} exceeds the split's {len(members)} members: every "
                "participant needs at least one record"
            )
        if len(members) % participants:
            raise ValueError(
                f"the split's {len(members)} members cannot be dealt into {participants} equal shares: set "
                f"data num_members to a multiple of {participants}"
            )
        for role, index in (("attacker.target_participant", target_participant),
                            ("attacker.local_attacker", local_attacker)):
            if not 0 <= index < participants:
                raise ValueError(f"{role}={index} is not a participant; participants are 0..{participants - 1}")
        wanted_members = sizes.known_members + sizes.target_members
        wanted_nonmembers = sizes.known_nonmembers + sizes.target_nonmembers
        if wanted_nonmembers > len(nonmembers):
            raise ValueError(
                f"attacker.known_nonmembers + attacker.target_nonmembers = {wanted_nonmembers} exceed the "
                f"split's {len(nonmembers)} non-members"
            )
        shares = tuple(np.sort(part) for part in np.split(_rng(seed, 0).permutation(members), participants))
        # Non-members are one draw shared by both positions: the two attackers are judged on the same outsiders.
        non = _rng(seed, 1).permutation(nonmembers)
        known_non = np.sort(non[: sizes.known_nonmembers])
        target_non = np.sort(non[sizes.known_nonmembers : wanted_nonmembers])
        attackers = {}
        for stream, position in enumerate(POSITIONS, start=2):
            if position not in positions:
                continue
            if position == "global":
                pool, what = shares[target_participant], "the target participant's share"
            elif participants < 2:
                raise ValueError("a local attacker needs at least 2 participants: its targets are the others' data")
            else:
                pool = np.concatenate([share for i, share in enumerate(shares) if i != local_attacker])
                what = "the other participants' shares (the local attacker's targets)"
            if wanted_members > len(pool):
                raise ValueError(
                    f"attacker.known_members + attacker.target_members = {wanted_members} exceed the "
                    f"{len(pool)} records of {what}"
                )
            drawn = _rng(seed, stream).permutation(pool)
            attackers[position] = AttackerRecords(
                known_members=np.sort(drawn[: sizes.known_members]),
                known_nonmembers=known_non,
                target_members=np.sort(drawn[sizes.known_members : wanted_members]),
                target_nonmembers=target_non,
            )
        return cls(shares, target_participant, local_attacker, attackers)

    @property
    def share_size(self) -> int:
        return len(self.shares[0])

    def save(self, path: Path) -> None:
        """The layout beside the split, so a reader can see which records each participant and attacker held."""
        arrays = {f"participant_{i}": share for i, share in enumerate(self.shares)}
        for position, records in self.attackers.items():
            arrays.update({f"{position}/{name}": getattr(records, name) for name in RECORD_SETS})
        arrays["target_participant"] = np.asarray(self.target_participant)
        arrays["local_attacker"] = np.asarray(self.local_attacker)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])
