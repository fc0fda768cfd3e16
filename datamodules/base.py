"""The membership split and the DataModule that owns it.

Every record of a dataset is in at most one of: target-train (members) or non-members. From these the attacker's
known sets (attack-train) and evaluation sets (attack-test) are drawn, disjoint and balanced. The split is saved
to ``split.npz`` and reloaded, so every arm of a comparison (DP or not) is attacked on the same records.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

PARTS = (
    "members",
    "nonmembers",
    "attack_train_members",
    "attack_train_nonmembers",
    "attack_test_members",
    "attack_test_nonmembers",
)
SPLIT_FORMAT_VERSION = 2  # 2 adds ``stratified``; version-1 files were drawn without stratification


def _resolve_count(value: int | float, pool: int, what: str) -> int:
    """A size given as a count (int >= 0) or a fraction of ``pool`` (float in (0, 1])."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a count or a fraction, got {value!r}")
    if isinstance(value, float) and value > 1.0 and value.is_integer():
        value = int(value)  # "150" on the command line may arrive as 150.0: a count, not a fraction
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{what} as a fraction must be in (0, 1], got {value}")
        return int(round(value * pool))
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return int(value)


def _take(pool: np.ndarray, k: int, rng: np.random.Generator, labels: np.ndarray | None) -> np.ndarray:
    """``k`` indices drawn from ``pool`` at random; with ``labels``, in the pool's class proportions.

    Per-class quotas are rounded by largest remainder, so every class count is within one record of
    ``k * class_share``: the drawn part has the pool's class mix, not a sample of it.
    """
    pool = rng.permutation(pool)
    if labels is None:
        return pool[:k]
    classes, counts = np.unique(labels[pool], return_counts=True)
    exact = k * counts / len(pool)
    quota = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: k - int(quota.sum())]] += 1
    taken = [pool[labels[pool] == c][:q] for c, q in zip(classes, quota)]
    return rng.permutation(np.concatenate(taken)) if taken else pool[:0]


@dataclass(frozen=True)
class MembershipSplit:
    """Index sets into one dataset; attack sets are subsets of members / non-members, pairwise disjoint.

    ``stratified``: every part was drawn in its pool's class proportions (see :meth:`draw`).
    """

    dataset_name: str
    dataset_size: int
    seed: int
    members: np.ndarray
    nonmembers: np.ndarray
    attack_train_members: np.ndarray
    attack_train_nonmembers: np.ndarray
    attack_test_members: np.ndarray
    attack_test_nonmembers: np.ndarray
    stratified: bool = False

    @classmethod
    def draw(
        cls,
        dataset_name: str,
        dataset_size: int,
        seed: int,
        num_members: int | float,
        num_nonmembers: int | float | None = None,
        attack_train_members: int | float | None = None,
        attack_train_nonmembers: int | float | None = None,
        attack_test_members: int | float | None = None,
        attack_test_nonmembers: int | float | None = None,
        labels: np.ndarray | None = None,
    ) -> MembershipSplit:
        """Draw a split from ``seed``. Attack-set sizes default to half of the smaller pool each, balanced.

        With ``labels`` (one per record) every part is stratified: drawn in its pool's class proportions. Without,
        per-class member counts scatter by sampling noise (about +/-20% at 25 records a class), and a model that
        merely learns class frequencies, as DP-SGD permits, then scores the over-represented classes as members:
        leakage that says nothing about the records.
        """
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (dataset_size,):
                raise ValueError(f"labels must have one entry per record ({dataset_size}), got shape {labels.shape}")
        n_mem = _resolve_count(num_members, dataset_size, "num_members")
        rest = dataset_size - n_mem
        n_non = rest if num_nonmembers is None else _resolve_count(num_nonmembers, dataset_size, "num_nonmembers")
        if n_mem < 2 or n_non < 2:
            raise ValueError(f"need at least 2 members and 2 non-members, got {n_mem} and {n_non}")
        if n_mem + n_non > dataset_size:
            raise ValueError(
                f"{n_mem} members + {n_non} non-members exceed the dataset's {dataset_size} records"
            )
        default = min(n_mem, n_non) // 2
        sizes = {
            "attack_train_members": (attack_train_members, n_mem),
            "attack_train_nonmembers": (attack_train_nonmembers, n_non),
            "attack_test_members": (attack_test_members, n_mem),
            "attack_test_nonmembers": (attack_test_nonmembers, n_non),
        }
        counts = {k: default if v is None else _resolve_count(v, pool, k) for k, (v, pool) in sizes.items()}
        if counts["attack_train_members"] + counts["attack_test_members"] > n_mem:
            raise ValueError(
                f"attack-train ({counts['attack_train_members']}) + attack-test ({counts['attack_test_members']})"
                f" members exceed the {n_mem} members"
            )
        if counts["attack_train_nonmembers"] + counts["attack_test_nonmembers"] > n_non:
            raise ValueError(
                f"attack-train ({counts['attack_train_nonmembers']}) + attack-test "
                f"({counts['attack_test_nonmembers']}) non-members exceed the {n_non} non-members"
            )
        rng = np.random.default_rng(seed)
        members = _take(np.arange(dataset_size), n_mem, rng, labels)
        nonmembers = _take(np.setdiff1d(np.arange(dataset_size), members), n_non, rng, labels)
        train_members = _take(members, counts["attack_train_members"], rng, labels)
        test_members = _take(np.setdiff1d(members, train_members), counts["attack_test_members"], rng, labels)
        train_nonmembers = _take(nonmembers, counts["attack_train_nonmembers"], rng, labels)
        test_nonmembers = _take(
            np.setdiff1d(nonmembers, train_nonmembers), counts["attack_test_nonmembers"], rng, labels
        )
        split = cls(
            dataset_name=dataset_name,
            dataset_size=dataset_size,
            seed=seed,
            members=np.sort(members),
            nonmembers=np.sort(nonmembers),
            attack_train_members=np.sort(train_members),
            attack_test_members=np.sort(test_members),
            attack_train_nonmembers=np.sort(train_nonmembers),
            attack_test_nonmembers=np.sort(test_nonmembers),
            stratified=labels is not None,
        )
        split.validate()
        return split

    def validate(self, dataset_name: str | None = None, dataset_size: int | None = None) -> None:
        """Refuse a split that does not fit the dataset or whose sets overlap."""
        if dataset_name is not None and dataset_name != self.dataset_name:
            raise ValueError(f"split was drawn for dataset {self.dataset_name!r}, not {dataset_name!r}")
        if dataset_size is not None and dataset_size != self.dataset_size:
            raise ValueError(
                f"split was drawn for {self.dataset_size} records but the dataset has {dataset_size}"
            )
        for part in PARTS:
            idx = getattr(self, part)
            if idx.ndim != 1 or idx.dtype.kind not in "iu":
                raise ValueError(f"split part {part!r} must be a 1-d integer array")
            if len(idx) and (idx.min() < 0 or idx.max() >= self.dataset_size):
                raise ValueError(f"split part {part!r} has indices outside [0, {self.dataset_size})")
            if len(np.unique(idx)) != len(idx):
                raise ValueError(f"split part {part!r} repeats indices")
        if np.intersect1d(self.members, self.nonmembers).size:
            raise ValueError("split is corrupt: members and non-members overlap")
        for part, pool in (
            ("attack_train_members", self.members),
            ("attack_test_members", self.members),
            ("attack_train_nonmembers", self.nonmembers),
            ("attack_test_nonmembers", self.nonmembers),
        ):
            if not np.isin(getattr(self, part), pool).all():
                raise ValueError(f"split is corrupt: {part} is not a subset of its pool")
        for a, b in (("attack_train_members", "attack_test_members"),
                     ("attack_train_nonmembers", "attack_test_nonmembers")):
            if np.intersect1d(getattr(self, a), getattr(self, b)).size:
                raise ValueError(f"split is corrupt: {a} and {b} overlap")

    def sizes(self) -> dict[str, int]:
        return {part: int(len(getattr(self, part))) for part in PARTS}

    def save(self, path: str | Path) -> None:
        """Write atomically, so an interrupted run never leaves a half-written split behind."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        os.close(fd)
        with open(tmp, "wb") as f:
            np.savez(
                f,
                format_version=SPLIT_FORMAT_VERSION,
                dataset_name=self.dataset_name,
                dataset_size=self.dataset_size,
                seed=self.seed,
                stratified=self.stratified,
                **{part: getattr(self, part) for part in PARTS},
            )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> MembershipSplit:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"split file {path} does not exist")
        if not zipfile.is_zipfile(path):
            raise ValueError(f"split file {path} is not a readable .npz (corrupt or another format)")
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("dataset_name", "dataset_size", "seed", *PARTS) if k not in z.files]
                if missing:
                    raise ValueError(f"split file {path} lacks {', '.join(missing)}")
                split = cls(
                    dataset_name=str(z["dataset_name"]),
                    dataset_size=int(z["dataset_size"]),
                    seed=int(z["seed"]),
                    stratified=bool(z["stratified"]) if "stratified" in z.files else False,
                    **{part: z[part].astype(np.int64) for part in PARTS},
                )
        except (OSError, EOFError, KeyError, zipfile.BadZipFile) as err:
            raise ValueError(f"split file {path} is not a readable .npz: {err}") from err
        split.validate()
        return split


class MembershipDataModule(L.LightningDataModule):
    """Base DataModule: subclasses say how to load the records; this class owns the membership split.

    Loaders: ``train_dataloader`` iterates the members (Poisson-sampled when ``poisson_sampling`` is set, as DP-SGD's
    accountant assumes); ``val_dataloader`` the non-members (the target's test accuracy); ``part_dataloader(part)``
    any part of the split in evaluation form, for attacks.

    ``stratify`` (default true) draws every part of the split in the dataset's class proportions, so membership
    scores cannot ride on which classes happen to be over-represented among the members.
    """

    dataset_name: str = "dataset"

    def __init__(
        self,
        num_members: int | float = 0.5,
        num_nonmembers: int | float | None = None,
        attack_train_members: int | float | None = None,
        attack_train_nonmembers: int | float | None = None,
        attack_test_members: int | float | None = None,
        attack_test_nonmembers: int | float | None = None,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        split_file: str | None = None,
        stratify: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {eval_batch_size}")
        self.split_sizes = dict(
            num_members=num_members,
            num_nonmembers=num_nonmembers,
            attack_train_members=attack_train_members,
            attack_train_nonmembers=attack_train_nonmembers,
            attack_test_members=attack_test_members,
            attack_test_nonmembers=attack_test_nonmembers,
        )
        self.seed = seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.split_file = split_file
        self.stratify = stratify
        self.poisson_sampling = False
        self.split: MembershipSplit | None = None
        self._train_generator: torch.Generator | None = None
        self._resumed_train_generator_state: torch.Tensor | None = None
        self._eval_dataset: Dataset | None = None
        self._train_dataset: Dataset | None = None

    # -- what subclasses provide -------------------------------------------------------------------------------
    @property
    @abstractmethod
    def num_classes(self) -> int: ...

    @property
    @abstractmethod
    def input_shape(self) -> tuple[int, ...]: ...

    @abstractmethod
    def load_dataset(self, train: bool) -> Dataset:
        """All records of the dataset, in one fixed order. ``train=True`` may add augmentation."""

    def check_available(self) -> None:
        """Raise a clear error (where to put which file) when the data is missing; called before any work."""

    def record_labels(self) -> np.ndarray:
        """Every record's class, in dataset order (what a stratified split needs). Subclasses with the labels at
        hand override this; the default reads them through the evaluation dataset."""
        dataset = self.eval_dataset
        loader = DataLoader(dataset, batch_size=self.eval_batch_size, num_workers=self.num_workers)
        return torch.cat([torch.as_tensor(batch[1]) for batch in loader]).numpy()

    # -- the split ---------------------------------------------------------------------------------------------
    def draw_split(self, dataset_size: int) -> MembershipSplit:
        labels = self.record_labels() if self.stratify else None
        return MembershipSplit.draw(self.dataset_name, dataset_size, self.seed, **self.split_sizes, labels=labels)

    def prepare_split(self) -> MembershipSplit:
        """Load the split file if present (and check it fits), else draw a new split and save it."""
        self.check_available()
        dataset = self.eval_dataset
        n = len(dataset)
        if self.split_file and Path(self.split_file).exists():
            split = MembershipSplit.load(self.split_file)
            try:
                split.validate(self.dataset_name, n)
            except ValueError as err:
                raise ValueError(f"split file {self.split_file} does not fit this dataset: {err}") from err
            expected = self.draw_split(n)
            if split.sizes() != expected.sizes():
                raise ValueError(
                    f"split file {self.split_file} has sizes {split.sizes()} but the config asks for "
                    f"{expected.sizes()}; use another run folder or remove the file"
                )
            if split.stratified != expected.stratified:
                raise ValueError(
                    f"split file {self.split_file} was drawn with stratify={split.stratified} but the config asks "
                    f"for stratify={expected.stratified}; use another run folder or remove the file"
                )
        else:
            split = self.draw_split(n)
            if self.split_file:
                split.save(self.split_file)
        self.split = split
        return split

    def setup(self, stage: str | None = None) -> None:
        if self.split is None:
            self.prepare_split()

    @property
    def eval_dataset(self) -> Dataset:
        if self._eval_dataset is None:
            self._eval_dataset = self.load_dataset(train=False)
        return self._eval_dataset

    @property
    def train_dataset(self) -> Dataset:
        if self._train_dataset is None:
            self._train_dataset = self.load_dataset(train=True)
        return self._train_dataset

    def part(self, name: str, train: bool = False) -> Dataset:
        if name not in PARTS:
            raise ValueError(f"unknown split part {name!r}; valid: {', '.join(PARTS)}")
        if self.split is None:
            self.setup()
        return Subset(self.train_dataset if train else self.eval_dataset, getattr(self.split, name).tolist())

    # -- loaders -----------------------------------------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        """The train loader's generator: seeded afresh for each fit, or continued from a resumed checkpoint."""
        generator = torch.Generator().manual_seed(self.seed)
        if self._resumed_train_generator_state is not None:
            generator.set_state(self._resumed_train_generator_state)
            self._resumed_train_generator_state = None
        self._train_generator = generator
        return generator

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Saved in Lightning checkpoints, so a resumed fit draws new batches rather than those of its first epochs
        again (DP-SGD's accountant assumes every Poisson draw is independent)."""
        return {} if self._train_generator is None else {"train_generator": self._train_generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self._resumed_train_generator_state = state_dict.get("train_generator")

    def train_dataloader(self) -> DataLoader:
        members = self.part("members", train=True)
        if self.poisson_sampling:
            from opacus.data_loader import DPDataLoader

            # Opacus' Poisson loader: its collate turns an empty draw into an empty batch instead of failing.
            return DPDataLoader(
                members, sample_rate=self.batch_size / len(members), generator=self._generator(),
                num_workers=self.num_workers,
            )
        return DataLoader(
            members, batch_size=self.batch_size, shuffle=True, generator=self._generator(),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self.part_dataloader("nonmembers")

    def part_dataloader(self, name: str) -> DataLoader:
        return DataLoader(self.part(name), batch_size=self.eval_batch_size, num_workers=self.num_workers)


class ArrayMembershipDataModule(MembershipDataModule):
    """For datasets that fit in memory as a feature matrix and a label vector (digits, Purchase, Texas, ...)."""

    @abstractmethod
    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (features, labels) with labels in [0, num_classes)."""

    def record_labels(self) -> np.ndarray:
        return self.eval_dataset.tensors[1].numpy()

    def load_dataset(self, train: bool) -> Dataset:
        if self._eval_dataset is not None:  # no augmentation: both views are the same tensors
            return self._eval_dataset
        x, y = self.load_arrays()
        x = torch.as_tensor(np.asarray(x), dtype=torch.float32).reshape(len(x), *self.input_shape)
        y = torch.as_tensor(np.asarray(y), dtype=torch.int64)
        if len(x) != len(y):
            raise ValueError(f"{self.dataset_name}: {len(x)} feature rows but {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(
                f"{self.dataset_name}: labels must lie in [0, {self.num_classes}), got [{y.min()}, {y.max()}]"
            )
        return TensorDataset(x, y)
