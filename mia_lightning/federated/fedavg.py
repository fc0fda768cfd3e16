"""FedAvg (McMahan et al. 2017) with Lightning local training, and the places where an active attacker acts.

Each round the server sends every participant a model; each participant trains it on its own share for
``local_epochs`` with a fresh Lightning Trainer and uploads the result; the server averages the uploads. A
participant's TargetModule and data stay with it for the whole federation, so a DP participant's accountant keeps
counting across rounds and its batches continue one random stream, as one centralised run's epochs do.
An attacker acts through ``Tampering``: what the server sends, what a participant uploads, and whom the server
isolates (sends back its own model instead of the average).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor

from datamodules.base import MembershipDataModule, MembershipSplit
from mia_lightning.snapshots import clean_state_dict
from mia_lightning.target import TargetModule

StateDict = dict[str, Tensor]
RoundCallback = Callable[[int, StateDict, list[StateDict]], None]
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


class ParticipantData(MembershipDataModule):
    """One participant's share as a MembershipDataModule whose members ARE the share, so TargetModule trains on it
    exactly as ``fit`` trains on a split's members, DP-SGD's Poisson sampling and accountant included.

    ``seed`` seeds ONE loader generator for the participant's whole federation: each round's batches continue where
    the previous round's stopped, so one participant training for R rounds of E epochs draws the same batches as a
    centralised run of R x E epochs on its share.
    """

    def __init__(self, source: MembershipDataModule, share: np.ndarray, seed: int) -> None:
        super().__init__(batch_size=source.batch_size, eval_batch_size=source.eval_batch_size, seed=seed,
                         num_workers=source.num_workers)
        if source.split is None:
            raise ValueError("the source DataModule has no split yet: call prepare_split() first")
        split, empty = source.split, np.empty(0, dtype=np.int64)
        self.split = MembershipSplit(
            dataset_name=split.dataset_name, dataset_size=split.dataset_size, seed=split.seed,
            members=np.sort(np.asarray(share, dtype=np.int64)), nonmembers=split.nonmembers,
            attack_train_members=empty, attack_train_nonmembers=empty,
            attack_test_members=empty, attack_test_nonmembers=empty,
        )
        self.split.validate()
        self.dataset_name = source.dataset_name
        self.source = source
        self.loader_generator = torch.Generator().manual_seed(seed)

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.source.input_shape

    def load_dataset(self, train: bool):
        return self.source.train_dataset if train else self.source.eval_dataset

    def _generator(self) -> torch.Generator:
        return self.loader_generator


@dataclass
class Participant:
    module: TargetModule
    data: ParticipantData


class Tampering:
    """An honest federation: nothing is changed. Active attackers override what they control."""

    isolated: int | None = None  # a participant the server trains alone (sends back its own upload)

    def sent(self, state: StateDict, participant: int) -> StateDict:
        """What the server really sends ``participant`` instead of ``state``."""
        return state

    def uploaded(self, state: StateDict, participant: int) -> StateDict:
        """What ``participant`` really uploads instead of its locally trained ``state``."""
        return state


def average_states(states: Sequence[StateDict]) -> StateDict:
    """FedAvg's aggregate for equal shares: the mean of every floating-point tensor.

    Integer tensors (e.g. BatchNorm's batch counter) cannot be averaged; they are taken from the first upload.
    """
    if not states:
        raise ValueError("cannot average an empty list of models")
    keys = list(states[0])
    for state in states[1:]:
        if list(state) != keys:
            raise ValueError("the uploads have different parameter names: they are not the same architecture")
    return {
        key: torch.stack([s[key] for s in states]).mean(dim=0) if states[0][key].is_floating_point()
        else states[0][key].clone()
        for key in keys
    }


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Hundreds of short fits: keep Lightning's per-fit banners and repeated warnings off the console."""
    levels = {name: logging.getLogger(name).level for name in LIGHTNING_LOGGERS}
    try:
        for name in LIGHTNING_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", ".*isinstance.treespec, LeafSpec.*")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def local_update(participant: Participant, epochs: int, seed: int, accelerator: str = "cpu") -> None:
    """``epochs`` of local training with a fresh Trainer (its overhead is ~10 ms; a round's fits are the cost).

    The global RNG (dropout, DP noise seeding) is forked and seeded from ``seed``, so a local update gives the same
    result whatever ran before it.
    """
    trainer = L.Trainer(
        max_epochs=epochs, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        deterministic=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trainer.fit(participant.module, datamodule=participant.data)


def update_seed(seed: int, round_: int, participant: int) -> int:
    """The same (seed, round, participant) gets the same local randomness in every training of an experiment."""
    return int(np.random.SeedSequence([seed, round_, participant]).generate_state(1)[0])


def run_fedavg(
    initial: StateDict,
    participants: Sequence[Participant],
    rounds: int,
    local_epochs: int,
    seed: int,
    tampering: Tampering | None = None,
    on_round: RoundCallback | None = None,
    accelerator: str = "cpu",
    progress: bool = False,
    description: str = "FedAvg",
) -> StateDict:
    """Train the federation for ``rounds`` rounds; returns the final aggregate.

    ``on_round(round, aggregate, uploads)`` runs after each round's aggregation (round counts from 1). With
    ``tampering.isolated`` set, the aggregate averages the other participants only, and the isolated one gets
    its own previous upload back.
    """
    if rounds < 1 or local_epochs < 1:
        raise ValueError(f"rounds and local_epochs must be >= 1, got {rounds} and {local_epochs}")
    tampering = tampering or Tampering()
    isolated = tampering.isolated
    if isolated is not None and not (len(participants) >= 2 and 0 <= isolated < len(participants)):
        raise ValueError(f"cannot isolate participant {isolated} of {len(participants)}: isolating needs >= 2")
    aggregate, uploads = initial, []
    with quiet_lightning(), Progress(disable=not progress) as bar:
        task = bar.add_task(description, total=rounds)
        for round_ in range(1, rounds + 1):
            received = []
            for i, participant in enumerate(participants):
                start = uploads[i] if i == isolated and uploads else aggregate
                participant.module.model.load_state_dict(tampering.sent(start, i))
                local_update(participant, local_epochs, update_seed(seed, round_, i), accelerator)
                received.append(tampering.uploaded(clean_state_dict(participant.module.model), i))
            uploads = received
            aggregate = average_states([u for i, u in enumerate(uploads) if i != isolated])
            if on_round is not None:
                on_round(round_, aggregate, uploads)
            bar.advance(task)
    return aggregate
