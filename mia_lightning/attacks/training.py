"""Training machinery the learned attacks share: batches read straight from FeatureSets, balanced sampling,
a held-out slice of the attacker's own records for model selection, and a seeded, deterministic Trainer run.

Features can be memory-mapped and large (a conv layer's gradients), so nothing is concatenated up front: a
batch gathers its rows from each part (known members, known non-members) on demand.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import lightning as L
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

Batch = tuple[dict[str, Tensor], Tensor]
EVALUATION_CHUNK = 1024  # records per forward pass when validating or scoring


class RecordBatches(Dataset):
    """Several parts (feature name -> tensor, record axis first) as one record axis, indexed a batch at a time.

    ``dataset[indices]`` returns (features as float32, targets) in the order of ``indices``. Use it with
    ``DataLoader(dataset, batch_size=None, sampler=...)`` and a sampler yielding index tensors.
    """

    def __init__(self, parts: Sequence[Mapping[str, Tensor]], targets: Tensor) -> None:
        self.parts = [dict(part) for part in parts]
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + next(iter(part.values())).shape[0])
        if targets.shape[0] != self.starts[-1]:
            raise ValueError(f"{targets.shape[0]} targets for {self.starts[-1]} records")
        self.targets = targets

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, indices: Tensor) -> Batch:
        indices = torch.as_tensor(indices, dtype=torch.long)
        positions, pieces = [], []
        for part, start, end in zip(self.parts, self.starts[:-1], self.starts[1:]):
            inside = (indices >= start) & (indices < end)
            positions.append(inside.nonzero().squeeze(1))
            rows = indices[inside] - start
            pieces.append({name: t[rows] for name, t in part.items()})
        order = torch.empty(len(indices), dtype=torch.long)
        order[torch.cat(positions)] = torch.arange(len(indices))
        features = {name: torch.cat([p[name] for p in pieces])[order].float() for name in self.parts[0]}
        return features, self.targets[indices]


class StratifiedBatchSampler(Sampler[Tensor]):
    """Batches drawing batch_size / len(groups) records from each group: half members, half non-members.

    An epoch runs until the largest group has been seen once; smaller groups are cycled through fresh
    permutations, so every batch is full and balanced. Seeded: the same seed gives the same batches.
    """

    def __init__(self, groups: Sequence[Tensor], batch_size: int, seed: int) -> None:
        if batch_size % len(groups):
            raise ValueError(f"batch_size {batch_size} must be a multiple of the number of groups {len(groups)}")
        if any(len(group) == 0 for group in groups):
            raise ValueError("every group needs at least one record")
        self.groups = [torch.as_tensor(group, dtype=torch.long) for group in groups]
        self.share = batch_size // len(groups)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(max(len(group) for group in self.groups) / self.share)

    def __iter__(self) -> Iterator[Tensor]:
        needed = len(self) * self.share
        streams = []
        for group in self.groups:
            permutations = [group[torch.randperm(len(group), generator=self.generator)]]
            while sum(len(p) for p in permutations) < needed:
                permutations.append(group[torch.randperm(len(group), generator=self.generator)])
            streams.append(torch.cat(permutations))
        for b in range(len(self)):
            yield torch.cat([stream[b * self.share : (b + 1) * self.share] for stream in streams])


def held_out_split(groups: Sequence[Tensor], fraction: float, seed: int) -> tuple[list[Tensor], list[Tensor]]:
    """Split each group at random into (train, validation), ``fraction`` of it (at least 1) to validation.

    Stratified by construction: the validation slice holds every group in proportion. Each group needs
    >= 2 records so both sides keep one.
    """
    generator = torch.Generator().manual_seed(seed)
    train, validation = [], []
    for group in groups:
        if len(group) < 2:
            raise ValueError(f"a group of {len(group)} record(s) cannot be split into training and validation")
        shuffled = group[torch.randperm(len(group), generator=generator)]
        n_val = min(max(1, round(fraction * len(group))), len(group) - 1)
        validation.append(shuffled[:n_val])
        train.append(shuffled[n_val:])
    return train, validation


def chunks(indices: Tensor, size: int) -> list[Tensor]:
    """Consecutive index batches, for evaluation in record order."""
    return list(torch.split(indices, size))


class BestEpochModule(L.LightningModule):
    """A LightningModule that keeps the weights of its best validation epoch and can restore them.

    Selection on the attacker's held-out slice, never on the evaluation set: the evaluation stays unbiased.
    """

    def __init__(self, maximize: bool) -> None:
        super().__init__()
        self.maximize = maximize
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self._best_state: dict[str, Tensor] | None = None

    def keep_if_best(self, value: float) -> None:
        better = self.best_value is None or (value > self.best_value if self.maximize else value < self.best_value)
        if better:
            self.best_value, self.best_epoch = value, self.current_epoch
            self._best_state = {k: v.detach().clone() for k, v in self.state_dict().items()}

    def restore_best(self) -> None:
        if self._best_state is None:
            raise ValueError("no validation epoch has run: nothing to restore")
        self.load_state_dict(self._best_state)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Global torch RNG seeded inside; on exit the caller's RNG state is back, and so are the flags that
    ``Trainer(deterministic=True)`` sets process-wide (deterministic algorithms, cuDNN benchmark).
    """
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark = benchmark


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads set to ``count`` inside (None: left as they are), restored on exit."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TrainingProgress(L.Callback):
    """A rich progress bar over an attack's training batches, with the validation metric.

    Not Lightning's RichProgressBar: when it starts, that one clears the console's live displays, including the
    target's own progress bar that is still open while the end-of-fit audit trains attacks, and the target's
    Trainer then fails in teardown ("pop from empty list"). A plain rich Progress nests and unwinds cleanly.
    """

    def __init__(self, description: str) -> None:
        self.description = description
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[metrics]}"),
        )
        self.task: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = trainer.max_epochs * trainer.num_training_batches
        self.task = self.progress.add_task(self.description, total=total, metrics="")
        self.progress.start()

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        self.progress.advance(self.task)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = ", ".join(f"{name} {float(value):.4g}" for name, value in trainer.callback_metrics.items())
        self.progress.update(self.task, metrics=f"epoch {trainer.current_epoch}: {metrics}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.progress.stop()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.progress.stop()


@contextmanager
def _quiet_trainer() -> Iterator[None]:
    """Hide the Trainer's per-fit banner (accelerators found, tips, "max_epochs reached"): an attack's Trainer
    is an implementation detail, and an audit fits several. Warnings still show.
    """
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # The batches are gathered from tensors in memory: loader workers would only add processes.
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            yield
    finally:
        logger.setLevel(level)


def train(
    module: BestEpochModule,
    train_batches: DataLoader,
    validation_batches: DataLoader,
    max_epochs: int,
    progress: str | None,
    accelerator: str,
) -> None:
    """Fit with a deterministic Lightning Trainer (no logger, no checkpoint files), then restore the best epoch.

    ``progress``: the progress bar's description, None for no bar. Call inside ``seeded`` for reproducible
    weights and dropout.
    """
    with _quiet_trainer():
        trainer = L.Trainer(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            callbacks=[TrainingProgress(progress)] if progress is not None else [],
            deterministic=True,
            num_sanity_val_steps=0,
        )
        trainer.fit(module, train_batches, validation_batches)
    module.restore_best()
    module.cpu()
