"""SYNTHETIC Purchase100-like data: 600 sparse binary features, 100 classes, generated from a seed (no download).

It stands in for Purchase100 on machines without the real file, so the whole pipeline (training, snapshots,
attacks, DP comparisons) runs at the paper's scale. It is not Purchase100, and results on it are not the paper's.

How records are made: each class has a prototype, a vector of Bernoulli probabilities: a low background rate on
every feature and a high rate on the class's signature features. Classes come in groups whose members draw half of
their signature from a shared pool, so prototypes overlap; a record is one independent Bernoulli draw from its
class's prototype. Overlap and noise make the classes hard to tell apart from a few hundred records each, so the
paper's ``purchase_fc`` model trained on 20,000 records memorises them (train accuracy ~100%) while its test
accuracy stays near the paper's Purchase100 model (about 80%): the gap that membership inference exploits.
"""

from __future__ import annotations

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from datamodules.base import ArrayMembershipDataModule

_CHUNK = 16_384  # records drawn per vectorised step: bounds the float32 temporary to ~40 MB


def class_prototypes(
    rng: np.random.Generator,
    num_features: int = 600,
    num_classes: int = 100,
    num_groups: int = 10,
    signature_size: int = 40,
    signal: float = 0.22,
    background: float = 0.02,
) -> np.ndarray:
    """(num_classes, num_features) Bernoulli probabilities: ``background`` everywhere, ``signal`` on the signature."""
    if not 0.0 <= background < signal <= 1.0:
        raise ValueError(f"need 0 <= background < signal <= 1, got background={background}, signal={signal}")
    if not 1 <= signature_size <= num_features // 2:
        raise ValueError(f"signature_size must be in [1, {num_features // 2}], got {signature_size}")
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    shared = signature_size // 2
    pools = [rng.choice(num_features, size=2 * signature_size, replace=False) for _ in range(num_groups)]
    prototypes = np.full((num_classes, num_features), background, dtype=np.float32)
    for c in range(num_classes):
        prototypes[c, rng.choice(pools[c % num_groups], size=shared, replace=False)] = signal
        prototypes[c, rng.choice(num_features, size=signature_size - shared, replace=False)] = signal
    return prototypes


def make_synthetic_purchase(
    num_records: int,
    seed: int = 0,
    num_features: int = 600,
    num_classes: int = 100,
    **prototype_kwargs,
) -> tuple[np.ndarray, np.ndarray]:
    """SYNTHETIC Purchase100-like records: ``(features uint8 (N, num_features) in {0, 1}, labels int64 (N,))``.

    The same ``seed`` gives the same prototypes and records; ``prototype_kwargs`` go to :func:`class_prototypes`.
    """
    if num_records < 1:
        raise ValueError(f"num_records must be >= 1, got {num_records}")
    if num_classes < 2 or num_features < 2:
        raise ValueError(f"need >= 2 classes and features, got {num_classes} and {num_features}")
    rng = np.random.default_rng(seed)
    prototypes = class_prototypes(rng, num_features, num_classes, **prototype_kwargs)
    labels = rng.integers(0, num_classes, size=num_records, dtype=np.int64)
    features = np.empty((num_records, num_features), dtype=np.uint8)
    for start in range(0, num_records, _CHUNK):
        y = labels[start : start + _CHUNK]
        features[start : start + len(y)] = rng.random((len(y), num_features), dtype=np.float32) < prototypes[y]
    return features, labels


class SyntheticPurchaseDataModule(ArrayMembershipDataModule):
    """SYNTHETIC Purchase100 stand-in (``dataset_name = "synthetic_purchase"``); see the module docstring.

    Args:
        num_records: how many records to generate (the pool the membership split draws from).
        data_seed: the generator's seed (the split has its own ``seed``).
    """

    dataset_name = "synthetic_purchase"

    def __init__(self, num_records: int = 40_000, data_seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_records < 4:
            raise ValueError(f"num_records must be >= 4 (2 members + 2 non-members), got {num_records}")
        self.num_records = num_records
        self.data_seed = data_seed

    @property
    def num_classes(self) -> int:
        return 100

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (600,)

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        rank_zero_info(
            f"synthetic_purchase: generating {self.num_records} SYNTHETIC Purchase100-like records "
            f"(seed {self.data_seed}); this is not the real Purchase100 dataset"
        )
        return make_synthetic_purchase(self.num_records, seed=self.data_seed)
