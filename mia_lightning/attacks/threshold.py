"""Black-box threshold attacks: one number per record from the prediction vector and the label, no training.

They are the baselines the learned attacks must beat: ``loss`` (Yeom et al. 2018), ``confidence`` (probability
of the true class), ``entropy`` of the prediction, and ``modified_entropy`` (Mentr, Song & Mittal 2021), which,
unlike the entropy, is low only when the model is confident in the TRUE class. Members get lower loss, entropy
and Mentr and higher confidence, so the scores are -loss, confidence, -entropy and -Mentr. All snapshots but
the last are ignored: these attack the final model.

Members are typically the records predicted MOST confidently, where p_y rounds to 1.0 even in float64 (logit
margin > ~37) and ``1 - p_y``, ``log p_y`` and every entropy become 0: the ranking that separates members is
lost. So the signals are computed in float64 from the log-softmax (``"log_output"``), with the probability
mass left to the other classes summed in log space (``1 - p_y = sum_{j != y} p_j``), and the confidence score
is the logit ``log p_y - log(1 - p_y)``: a monotone map of p_y (same ranking, same AUC) that does not saturate.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from mia_lightning.attacks.base import Attack, balanced_threshold, check_feature_set, check_known_sets
from mia_lightning.features import LOG_OUTPUT, FeatureSet, FeatureSpec

LOG_PREDICTION = f"output/{LOG_OUTPUT}"
# log of the smallest normal float64: log-probabilities are floored here, so that a -inf logit (p = 0 exactly)
# gives finite signals, as the 1e-30 probability floor of Song & Mittal's code does.
MIN_LOG_PROB = float(np.log(np.finfo(np.float64).tiny))
SIGNALS = ("loss", "confidence", "entropy", "modified_entropy")


def log_probabilities(log_probs: Tensor) -> tuple[Tensor, Tensor]:
    """(log p, log(1 - p)) of log-softmax rows (N, C), float64, both accurate near p = 0 and near p = 1.

    At most one class per row has p > 1/2: there ``log(1 - p)`` is the log-sum-exp of the OTHER classes and
    ``log p = log1p(-(1 - p))``; the stored value would be 0.0 for a confident prediction. Elsewhere
    ``log(1 - p) = log1p(-p)``, accurate because p <= 1/2. Log-probabilities are floored at MIN_LOG_PROB.
    """
    log_p = log_probs.double().clamp_min(MIN_LOG_PROB)
    top = log_p.argmax(dim=1, keepdim=True)
    is_top = torch.zeros_like(log_p, dtype=torch.bool).scatter_(1, top, True) & (log_p > -math.log(2.0))
    log_rest = log_p.masked_fill(is_top, float("-inf")).logsumexp(dim=1, keepdim=True)  # log(1 - p_top)
    log_p = torch.where(is_top, torch.log1p(-torch.exp(log_rest)), log_p)
    log_complement = torch.where(is_top, log_rest, torch.log1p(-torch.exp(log_p)))
    return log_p, log_complement


def confidence_logit(log_probs: Tensor, targets: Tensor) -> Tensor:
    """log p_y - log(1 - p_y) of each record's true class y, float64 (N,): increasing in p_y, never saturated."""
    log_p, log_complement = log_probabilities(log_probs)
    index = targets.long().unsqueeze(1)
    return (log_p.gather(1, index) - log_complement.gather(1, index)).squeeze(1)


def prediction_entropy(log_probs: Tensor) -> Tensor:
    """Shannon entropy -sum_i p_i log p_i of each prediction (nats), float64 (N,)."""
    log_p, _ = log_probabilities(log_probs)
    return -(log_p.exp() * log_p).sum(dim=1)


def modified_entropy(log_probs: Tensor, targets: Tensor) -> Tensor:
    """Mentr = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i), float64 (N,) (Song & Mittal 2021, eq. 4)."""
    log_p, log_complement = log_probabilities(log_probs)
    is_true = torch.zeros_like(log_p, dtype=torch.bool).scatter_(1, targets.long().unsqueeze(1), True)
    weight = torch.where(is_true, log_complement, log_p).exp()  # 1 - p_y for the true class, p_i otherwise
    log_term = torch.where(is_true, log_p, log_complement)
    return -(weight * log_term).sum(dim=1)


class ThresholdAttack(Attack):
    """Scores records by one signal of the final prediction; the threshold is fitted on the known sets.

    Args:
        signal: ``loss`` | ``confidence`` | ``entropy`` | ``modified_entropy``.
        name: the name results are reported under; defaults to the signal.
    """

    def __init__(self, signal: str, name: str | None = None) -> None:
        if signal not in SIGNALS:
            raise ValueError(f"unknown signal {signal!r}; available: {', '.join(SIGNALS)}")
        self.signal = signal
        self.name = name or signal
        self.num_classes_: int | None = None

    def feature_spec(self, model: nn.Module) -> FeatureSpec:
        if self.signal == "loss":
            return FeatureSpec(outputs=(), gradients=(), loss=True, label=False)
        return FeatureSpec(outputs=(LOG_OUTPUT,), gradients=(), loss=False, label=False)

    def _signal_scores(self, features: FeatureSet, num_classes: int | None) -> np.ndarray:
        needed = ("loss",) if self.signal == "loss" else (LOG_PREDICTION, "target")
        missing = [name for name in needed if name not in features]
        if missing:
            raise ValueError(
                f"the {self.name} attack needs features {missing}; the FeatureSet has {list(features.names)}"
            )
        if self.signal == "loss":
            return -features["loss"][:, -1, 0].double().numpy()
        log_probs, targets = features[LOG_PREDICTION][:, -1], features["target"]
        if num_classes is not None and log_probs.shape[1] != num_classes:
            raise ValueError(
                f"the {self.name} attack was fitted on {num_classes}-class predictions, got {log_probs.shape[1]}"
            )
        if self.signal == "confidence":
            return confidence_logit(log_probs, targets).numpy()
        if self.signal == "entropy":
            return -prediction_entropy(log_probs).numpy()
        return -modified_entropy(log_probs, targets).numpy()

    def fit(self, train_members: FeatureSet, train_nonmembers: FeatureSet) -> ThresholdAttack:
        members, nonmembers = check_known_sets(train_members, train_nonmembers)
        member_scores = self._signal_scores(members, None)
        num_classes = None if self.signal == "loss" else int(members[LOG_PREDICTION].shape[-1])
        scores = np.concatenate([member_scores, self._signal_scores(nonmembers, num_classes)])
        labels = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
        self.threshold_ = balanced_threshold(scores, labels)
        self.num_classes_ = num_classes
        return self

    def score(self, features: FeatureSet) -> np.ndarray:
        if self.threshold_ is None:
            raise ValueError(f"the {self.name} attack is not fitted: call fit() first")
        return self._signal_scores(check_feature_set(features, "features"), self.num_classes_)
