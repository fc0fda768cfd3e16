"""What every attack is: it names the features it needs, learns from the attacker's known sets, scores records.

Scores are float64 and higher means "more likely member", so every attack feeds the same metrics. A supervised
attack also fixes a decision threshold on its known sets (``threshold_``), so a hard member / non-member call can
be reported beside the threshold-free metrics without ever looking at the evaluation set.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from torch import nn

from mia_lightning.features import FeatureSet, FeatureSpec
from mia_lightning.metrics import roc_curve

MIN_KNOWN_RECORDS = 2  # per class: one to train on and one to select on, at the very least


class Attack(ABC):
    """A membership-inference attack: ``feature_spec`` -> extract -> ``fit`` -> ``score`` / ``predict``."""

    name: str
    threshold_: float | None = None

    @abstractmethod
    def feature_spec(self, model: nn.Module) -> FeatureSpec:
        """The features this attack reads from ``model`` (the target network)."""

    @abstractmethod
    def fit(self, train_members: FeatureSet, train_nonmembers: FeatureSet) -> Attack:
        """Learn from the attacker's known members and non-members; returns self."""

    @abstractmethod
    def score(self, features: FeatureSet) -> np.ndarray:
        """One float64 score per record, higher = more likely member; a record's score does not depend on
        the other records in ``features``.
        """

    def predict(self, features: FeatureSet) -> np.ndarray:
        """Hard calls (True = member): score >= the threshold chosen on the known sets."""
        if self.threshold_ is None:
            raise ValueError(f"the {self.name} attack is not fitted: call fit() first")
        return self.score(features) >= self.threshold_

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def check_positive_int(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")


def check_feature_set(features: object, role: str) -> FeatureSet:
    """Refuse anything but a FeatureSet, so a dict of tensors fails here and not deep inside an attack."""
    if not isinstance(features, FeatureSet):
        raise ValueError(f"{role} must be a FeatureSet (mia_lightning.features), got {type(features).__name__}")
    return features


def check_known_sets(train_members: object, train_nonmembers: object) -> tuple[FeatureSet, FeatureSet]:
    """Both known sets are FeatureSets with at least MIN_KNOWN_RECORDS records each."""
    members = check_feature_set(train_members, "train_members")
    nonmembers = check_feature_set(train_nonmembers, "train_nonmembers")
    if len(members) < MIN_KNOWN_RECORDS or len(nonmembers) < MIN_KNOWN_RECORDS:
        raise ValueError(
            f"an attack needs at least {MIN_KNOWN_RECORDS} known members and {MIN_KNOWN_RECORDS} known "
            f"non-members, got {len(members)} and {len(nonmembers)}"
        )
    return members, nonmembers


def balanced_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold with the highest balanced accuracy on (scores, labels), predicting member for score >= it.

    Any threshold between the best ROC point's score and the next lower distinct score is equally good on these
    records; the midpoint generalises best. ``inf`` (nobody is a member) when no threshold beats chance here.
    """
    fpr, tpr, thresholds = roc_curve(scores, labels)
    n_members = int(np.sum(labels))
    n_nonmembers = len(labels) - n_members
    # TPR - FPR compared in integer counts: float rates would break exact ties by rounding.
    true_positives, false_positives = np.rint(tpr * n_members), np.rint(fpr * n_nonmembers)
    advantage = true_positives.astype(np.int64) * n_nonmembers - false_positives.astype(np.int64) * n_members
    best = int(np.argmax(advantage))  # first maximum: the highest such threshold
    if best == 0:
        return float("inf")
    if best == len(thresholds) - 1:  # admit everyone: the lowest score itself
        return float(thresholds[best])
    return float(thresholds[best] / 2.0 + thresholds[best + 1] / 2.0)
