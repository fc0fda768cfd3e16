"""Membership-inference evaluation metrics, exact and with confidence intervals.

Audit reports quote these numbers, so every metric is computed on the exact ROC (one point per distinct score,
ties as one step), never on a binned curve, and small evaluation sets are refused where they cannot support a
number (TPR at an FPR below 1 / n_nonmembers).

Conventions: ``scores`` are higher for "more likely member"; ``labels`` are 1 for members, 0 for non-members.
A threshold ``t`` predicts "member" for ``score >= t``.
"""

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import stats
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def rank_normalise(scores: Any) -> np.ndarray:
    """Map scores to [0, 1] by average rank, keeping order and ties.

    torchmetrics applies a sigmoid to any score outside [0, 1]; large scores then collapse to a tie at 1.0.
    Ranks in [0, 1] pass through unchanged, so a torchmetrics ROC on them equals the exact ROC.
    All-tied (or single) scores map to 0.5.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {values.shape}")
    if np.isnan(values).any():
        raise ValueError(f"scores contain {int(np.isnan(values).sum())} NaN values")
    if values.size <= 1:
        return np.full(values.shape, 0.5)
    return (stats.rankdata(values, method="average") - 1.0) / (values.size - 1)


class _RocCounts(NamedTuple):
    """Cumulative counts at each ROC point: the computation every metric here shares."""

    thresholds: np.ndarray  # inf (nobody predicted member), then each distinct score, descending
    true_positives: np.ndarray  # members with score >= threshold (int64)
    false_positives: np.ndarray  # non-members with score >= threshold (int64)
    n_members: int
    n_nonmembers: int


def _validate(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return (float64 scores, bool is_member) or raise a ValueError naming the problem."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D, got shapes {scores.shape} and {labels.shape}")
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in length: {scores.size} vs {labels.size}")
    if not (np.issubdtype(scores.dtype, np.number) or scores.dtype == np.bool_):
        raise ValueError(f"scores must be numeric, got dtype {scores.dtype}")
    scores = scores.astype(np.float64)
    if np.isnan(scores).any():
        raise ValueError(f"scores contain {int(np.isnan(scores).sum())} NaN values")
    if np.isinf(scores).any():
        raise ValueError(
            f"scores contain {int(np.isinf(scores).sum())} infinite values; "
            "map them with rank_normalise first"
        )
    if not (np.issubdtype(labels.dtype, np.number) or labels.dtype == np.bool_):
        raise ValueError(f"labels must be 0/1, got dtype {labels.dtype}")
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        raise ValueError(f"labels must be 0 (non-member) or 1 (member), got {np.unique(labels[bad])[:5]}")
    is_member = labels.astype(bool)
    n_members = int(is_member.sum())
    if n_members == 0 or n_members == is_member.size:
        raise ValueError(
            "need at least one member and one non-member, "
            f"got {n_members} members and {is_member.size - n_members} non-members"
        )
    return scores, is_member


def _roc_counts(scores: Any, labels: Any) -> _RocCounts:
    scores, is_member = _validate(scores, labels)
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_members = is_member[order]
    # The last index of each run of equal scores: a threshold there admits the whole tie group at once.
    group_ends = np.flatnonzero(np.diff(sorted_scores) != 0)
    group_ends = np.append(group_ends, sorted_scores.size - 1)
    true_positives = np.cumsum(sorted_members, dtype=np.int64)[group_ends]
    false_positives = (group_ends + 1) - true_positives
    zero = np.zeros(1, dtype=np.int64)
    return _RocCounts(
        thresholds=np.concatenate([[np.inf], sorted_scores[group_ends]]),
        true_positives=np.concatenate([zero, true_positives]),
        false_positives=np.concatenate([zero, false_positives]),
        n_members=int(is_member.sum()),
        n_nonmembers=int((~is_member).sum()),
    )


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC: one point per distinct score, from (0, 0) at threshold inf to (1, 1).

    Returns (fpr, tpr, thresholds); point i predicts "member" for score >= thresholds[i]. Same points as
    ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)``.
    """
    counts = _roc_counts(scores, labels)
    fpr = counts.false_positives / counts.n_nonmembers
    tpr = counts.true_positives / counts.n_members
    return fpr, tpr, counts.thresholds


def _auc(counts: _RocCounts) -> float:
    # Trapezoid area in integer counts (exact), one division at the end.
    tp, fp = counts.true_positives, counts.false_positives
    twice_area = int(np.sum(np.diff(fp) * (tp[1:] + tp[:-1])))
    return twice_area / (2 * counts.n_members * counts.n_nonmembers)


def roc_auc(scores: Any, labels: Any) -> float:
    """Area under the exact ROC: Mann-Whitney U / (n_members * n_nonmembers), ties counted 1/2."""
    return _auc(_roc_counts(scores, labels))


def auc_confidence_interval(scores: Any, labels: Any, alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided (1 - alpha) AUC interval from DeLong et al. (1988)'s standard error, clipped to [0, 1].

    DeLong is nonparametric and counts ties as 1/2, like the AUC itself (Hanley-McNeil assumes exponentially
    distributed scores and ignores ties). Needs >= 2 members and >= 2 non-members. At AUC 0 or 1 the standard
    error is 0, so the interval is a single point: report n_members / n_nonmembers beside it.
    """
    _check_alpha(alpha)
    scores, is_member = _validate(scores, labels)
    members, nonmembers = np.sort(scores[is_member]), np.sort(scores[~is_member])
    if members.size < 2 or nonmembers.size < 2:
        raise ValueError(
            "the AUC interval needs >= 2 members and >= 2 non-members, "
            f"got {members.size} and {nonmembers.size}"
        )
    # Placement values: for each member, the share of non-members it beats (ties 1/2), and vice versa.
    below = np.searchsorted(nonmembers, members, side="left")
    at_or_below = np.searchsorted(nonmembers, members, side="right")
    member_placements = (below + at_or_below) / (2.0 * nonmembers.size)
    above = members.size - np.searchsorted(members, nonmembers, side="right")
    at_or_above = members.size - np.searchsorted(members, nonmembers, side="left")
    nonmember_placements = (above + at_or_above) / (2.0 * members.size)
    auc = float(member_placements.mean())
    variance = (
        member_placements.var(ddof=1) / members.size + nonmember_placements.var(ddof=1) / nonmembers.size
    )
    half_width = float(stats.norm.ppf(1.0 - alpha / 2.0)) * math.sqrt(variance)
    return max(0.0, auc - half_width), min(1.0, auc + half_width)


def _advantage(counts: _RocCounts) -> float:
    tpr = counts.true_positives / counts.n_members
    fpr = counts.false_positives / counts.n_nonmembers
    return float(np.max(tpr - fpr))


def best_balanced_accuracy(scores: Any, labels: Any) -> float:
    """Balanced accuracy (TPR + 1 - FPR) / 2 at the best threshold; 0.5 at worst (predict all one class).

    The direction is fixed (higher score = member): an inverted attack scores 0.5, not 1. Equals
    (1 + advantage) / 2.
    """
    return (1.0 + _advantage(_roc_counts(scores, labels))) / 2.0


def advantage(scores: Any, labels: Any) -> float:
    """Membership advantage max(TPR - FPR) over thresholds (Yeom et al. 2018); in [0, 1]."""
    return _advantage(_roc_counts(scores, labels))


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _check_delta(delta: float) -> None:
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")


def _clopper_pearson_bounds(
    successes: np.ndarray, trials: int, alpha: float
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised two-sided Clopper-Pearson bounds; each end is a one-sided bound at level alpha / 2."""
    k = np.asarray(successes, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):  # beta(0, .) at k = 0 / n, replaced below
        low = np.where(k > 0, stats.beta.ppf(alpha / 2.0, k, trials - k + 1), 0.0)
        high = np.where(k < trials, stats.beta.ppf(1.0 - alpha / 2.0, k + 1, trials - k), 1.0)
    return low, high


def _is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) binomial interval for k successes in n trials (Clopper-Pearson 1934).

    Conservative: coverage is >= 1 - alpha for every true proportion. lo = 0 when k = 0, hi = 1 when k = n.
    """
    if not (_is_integer(k) and _is_integer(n)):
        raise ValueError(f"k and n must be integers, got {k!r} and {n!r}")
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need n >= 1 and 0 <= k <= n, got k={k}, n={n}")
    _check_alpha(alpha)
    low, high = _clopper_pearson_bounds(np.asarray(k), int(n), alpha)
    return float(low), float(high)


@dataclass(frozen=True)
class TprAtFpr:
    """TPR at a fixed FPR with its Clopper-Pearson interval, or None and the reason it cannot be reported."""

    value: float | None
    ci_low: float | None
    ci_high: float | None
    reason: str | None = None


def _parse_fpr(fpr: float) -> Fraction:
    """The FPR as the decimal the user wrote (0.001 -> 1/1000), so 1/fpr and fpr * n are exact."""
    if isinstance(fpr, (bool, np.bool_)) or not isinstance(fpr, (int, float, np.floating)):
        raise ValueError(f"fpr must be a number, got {fpr!r}")
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    return Fraction(repr(float(fpr)))


def _tpr_at_fpr(counts: _RocCounts, fpr: float, alpha: float) -> TprAtFpr:
    target = _parse_fpr(fpr)
    needed = math.ceil(1 / target)
    if counts.n_nonmembers < needed:
        return TprAtFpr(None, None, None, f"needs >= {needed} non-members, have {counts.n_nonmembers}")
    max_false_positives = math.floor(target * counts.n_nonmembers)
    # Counts rise along the ROC, so the last admissible point has the highest TPR.
    last = int(np.searchsorted(counts.false_positives, max_false_positives, side="right")) - 1
    true_positives = int(counts.true_positives[last])
    low, high = _clopper_pearson_bounds(np.asarray(true_positives), counts.n_members, alpha)
    return TprAtFpr(true_positives / counts.n_members, float(low), float(high))


def tpr_at_fpr(scores: Any, labels: Any, fpr: float, alpha: float = 0.05) -> TprAtFpr:
    """Highest TPR at any threshold whose empirical FPR is <= fpr, with a (1 - alpha) interval on the TPR.

    Refused (value None, with a reason) when n_nonmembers < 1 / fpr: the empirical FPR then cannot resolve
    fpr, and the number would really be TPR at FPR 0. The interval covers the TPR at the chosen threshold;
    it does not include the uncertainty in that threshold's true FPR.
    """
    _parse_fpr(fpr)
    _check_alpha(alpha)
    return _tpr_at_fpr(_roc_counts(scores, labels), fpr, alpha)


def _epsilon_bounds(false_positives: np.ndarray, false_negatives: np.ndarray, n_nonmembers: int, n_members: int,
                    delta: float, alpha: float) -> np.ndarray:
    """The epsilon lower bound at each threshold (given its FP and FN counts), floored at 0."""
    _, fpr_high = _clopper_pearson_bounds(false_positives, n_nonmembers, alpha)
    _, fnr_high = _clopper_pearson_bounds(false_negatives, n_members, alpha)
    # (eps, delta)-DP implies FPR + e^eps FNR >= 1 - delta and FNR + e^eps FPR >= 1 - delta.
    # Upper bounds are > 0 (a Clopper-Pearson upper end is never 0); non-positive numerators give no bound.
    with np.errstate(divide="ignore", invalid="ignore"):
        from_fnr = np.log(np.clip(1.0 - delta - fnr_high, 0.0, None) / fpr_high)
        from_fpr = np.log(np.clip(1.0 - delta - fpr_high, 0.0, None) / fnr_high)
    return np.maximum(0.0, np.maximum(from_fnr, from_fpr))


def _counts_bounds(counts: _RocCounts, delta: float, alpha: float) -> np.ndarray:
    return _epsilon_bounds(counts.false_positives, counts.n_members - counts.true_positives, counts.n_nonmembers,
                           counts.n_members, delta, alpha)


def _empirical_epsilon(counts: _RocCounts, delta: float, alpha: float) -> float:
    return float(np.max(_counts_bounds(counts, delta, alpha)))


def _empirical_epsilon_at(scores: np.ndarray, is_member: np.ndarray, threshold: float, delta: float,
                          alpha: float) -> float:
    """The bound at one threshold fixed in advance ("member" for score >= threshold)."""
    admitted = scores >= threshold
    false_positives = np.asarray(int(np.sum(admitted & ~is_member)))
    false_negatives = np.asarray(int(np.sum(~admitted & is_member)))
    return float(_epsilon_bounds(false_positives, false_negatives, int((~is_member).sum()), int(is_member.sum()),
                                 delta, alpha))


def empirical_epsilon_lower_bound(
    scores: Any,
    labels: Any,
    delta: float = 0.0,
    alpha: float = 0.05,
    calibration: tuple[Any, Any] | None = None,
) -> float:
    """Lower bound on the epsilon of the mechanism that produced the model, as in Jagielski et al. (2020).

    At a threshold, take Clopper-Pearson upper bounds on FPR and FNR, each one-sided at level alpha / 2 (the upper
    ends of two-sided 1 - alpha intervals), so both hold together with probability >= 1 - alpha; the bound is
    max(log((1 - delta - FNR_hi) / FPR_hi), log((1 - delta - FPR_hi) / FNR_hi)), floored at 0.

    With ``calibration`` = (scores, labels) of other records (the attacker's own known records), the threshold
    is the one that maximises the bound there, and the bound is taken on (scores, labels) at that threshold:
    a strict lower bound at confidence 1 - alpha. Without it the threshold maximises the bound on (scores,
    labels) themselves, as Jagielski et al. do: choosing among many thresholds on the data that bound them makes
    the stated confidence nominal, no longer guaranteed.
    """
    _check_delta(delta)
    _check_alpha(alpha)
    return _lower_bound(scores, labels, _roc_counts(scores, labels), delta, alpha, calibration)


def _lower_bound(scores: Any, labels: Any, counts: _RocCounts, delta: float, alpha: float,
                 calibration: tuple[Any, Any] | None) -> float:
    if calibration is None:
        return _empirical_epsilon(counts, delta, alpha)
    reference = _roc_counts(*calibration)
    threshold = float(reference.thresholds[int(np.argmax(_counts_bounds(reference, delta, alpha)))])
    values, is_member = _validate(scores, labels)
    return _empirical_epsilon_at(values, is_member, threshold, delta, alpha)


def fpr_key(fpr: float) -> str:
    """The metrics.json key for an FPR: the shortest decimal that round-trips (0.001 -> "0.001")."""
    return repr(float(fpr))


def evaluate_attack(
    scores: Any,
    labels: Any,
    delta: float = 0.0,
    fprs: tuple[float, ...] = (0.001, 0.01),
    alpha: float = 0.05,
    calibration: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """One attack's entry of metrics.json (DESIGN.md contract) plus confidence intervals, JSON-ready.

    Keys: auc, accuracy (best balanced), advantage, tpr_at_fpr {fpr_key: value | None}, eps_lower_bound,
    n_members, n_nonmembers, and extras auc_ci ([lo, hi], None with < 2 of a class), tpr_at_fpr_ci
    {fpr_key: [lo, hi] | None}, tpr_at_fpr_note {fpr_key: reason | None}, eps_lower_bound_threshold
    ("calibration": strict, threshold chosen on ``calibration``; "evaluation": nominal; see
    :func:`empirical_epsilon_lower_bound`).
    """
    _check_delta(delta)
    _check_alpha(alpha)
    for fpr in fprs:
        _parse_fpr(fpr)
    counts = _roc_counts(scores, labels)
    eps_lower_bound = _lower_bound(scores, labels, counts, delta, alpha, calibration)
    at_fpr = {fpr_key(fpr): _tpr_at_fpr(counts, fpr, alpha) for fpr in fprs}
    enough_for_ci = min(counts.n_members, counts.n_nonmembers) >= 2
    accuracy_advantage = _advantage(counts)
    return {
        "auc": _auc(counts),
        "accuracy": (1.0 + accuracy_advantage) / 2.0,
        "advantage": accuracy_advantage,
        "tpr_at_fpr": {key: result.value for key, result in at_fpr.items()},
        "eps_lower_bound": eps_lower_bound,
        "n_members": counts.n_members,
        "n_nonmembers": counts.n_nonmembers,
        "auc_ci": list(auc_confidence_interval(scores, labels, alpha)) if enough_for_ci else None,
        "tpr_at_fpr_ci": {
            key: None if result.value is None else [result.ci_low, result.ci_high]
            for key, result in at_fpr.items()
        },
        "tpr_at_fpr_note": {key: result.reason for key, result in at_fpr.items()},
        "eps_lower_bound_threshold": "evaluation" if calibration is None else "calibration",
    }


class MembershipMetrics(Metric):
    """Accumulates (scores, labels) over batches; compute() returns evaluate_attack's dict.

    Use update() per batch and compute() once: forward() would evaluate each batch alone, which fails on a
    batch holding one class. States are concatenated across processes (dist_reduce_fx="cat").
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(
        self,
        delta: float = 0.0,
        fprs: tuple[float, ...] = (0.001, 0.01),
        alpha: float = 0.05,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_delta(delta)
        _check_alpha(alpha)
        for fpr in fprs:
            _parse_fpr(fpr)
        self.delta, self.fprs, self.alpha = delta, tuple(fprs), alpha
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        scores, labels = scores.detach().flatten(), labels.detach().flatten()
        if scores.shape != labels.shape:
            raise ValueError(f"scores and labels differ in length: {scores.numel()} vs {labels.numel()}")
        if not torch.isfinite(scores).all():
            raise ValueError("scores contain NaN or infinite values")
        if not ((labels == 0) | (labels == 1)).all():
            raise ValueError("labels must be 0 (non-member) or 1 (member)")
        # Kept in the input dtype (float64 is unavailable on some accelerators); widened in compute().
        self.scores.append(scores)
        self.labels.append(labels.to(torch.int64))

    def compute(self) -> dict[str, Any]:
        if len(self.scores) == 0:
            raise ValueError("MembershipMetrics.compute() called before any update()")
        scores = dim_zero_cat(self.scores).cpu().double().numpy()
        labels = dim_zero_cat(self.labels).cpu().numpy()
        return evaluate_attack(scores, labels, delta=self.delta, fprs=self.fprs, alpha=self.alpha)
