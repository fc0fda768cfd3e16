import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_curve as sklearn_roc_curve
from torchmetrics.functional.classification import binary_auroc

from mia_lightning.metrics import (
    MembershipMetrics,
    TprAtFpr,
    advantage,
    auc_confidence_interval,
    best_balanced_accuracy,
    clopper_pearson,
    empirical_epsilon_lower_bound,
    evaluate_attack,
    fpr_key,
    rank_normalise,
    roc_auc,
    roc_curve,
    tpr_at_fpr,
)


def separated(n_members: int, n_nonmembers: int, inverted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Members score 1000.., non-members 0..: perfectly separated (or inverted)."""
    scores = np.concatenate([1000.0 + np.arange(n_members), np.arange(n_nonmembers, dtype=float)])
    labels = np.concatenate([np.ones(n_members, int), np.zeros(n_nonmembers, int)])
    return (-scores if inverted else scores), labels


def random_with_ties(seed: int, n: int = 300, levels: int = 12) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = rng.integers(0, levels, n) + 2.0 * labels  # informative, many ties
    return scores.astype(float), labels


def randomized_response(epsilon: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """epsilon-DP randomized response: members report 1 w.p. e^eps / (1 + e^eps), others 1 / (1 + e^eps)."""
    rng = np.random.default_rng(seed)
    p_member = math.exp(epsilon) / (1 + math.exp(epsilon))
    labels = np.concatenate([np.ones(n, int), np.zeros(n, int)])
    report_one = rng.random(2 * n) < np.where(labels == 1, p_member, 1 - p_member)
    return report_one.astype(float), labels


# Slow obvious implementations the fast paths are checked against.


def brute_force_operating_points(scores, labels):
    """(fp, tp) counts for threshold inf and every distinct score, by direct counting."""
    scores, labels = np.asarray(scores, float), np.asarray(labels)
    points = [(0, 0)]
    for threshold in sorted(set(scores.tolist()), reverse=True):
        predicted = scores >= threshold
        points.append((int(np.sum(predicted & (labels == 0))), int(np.sum(predicted & (labels == 1)))))
    return points


def brute_force_mann_whitney(scores, labels):
    members, nonmembers = scores[labels == 1], scores[labels == 0]
    wins = sum(float(m > n) + 0.5 * float(m == n) for m in members for n in nonmembers)
    return wins / (members.size * nonmembers.size)


def brute_force_delong(scores, labels, alpha):
    members, nonmembers = scores[labels == 1], scores[labels == 0]
    psi = np.array([[float(m > n) + 0.5 * float(m == n) for n in nonmembers] for m in members])
    auc = psi.mean()
    variance = (
        np.var(psi.mean(axis=1), ddof=1) / members.size + np.var(psi.mean(axis=0), ddof=1) / nonmembers.size
    )
    z = stats.norm.ppf(1 - alpha / 2)
    return max(0.0, auc - z * math.sqrt(variance)), min(1.0, auc + z * math.sqrt(variance))


def brute_force_rank_normalise(scores):
    scores = np.asarray(scores, float)
    average_rank = np.array([np.sum(scores < s) + (np.sum(scores == s) + 1) / 2 for s in scores])
    return (average_rank - 1) / (scores.size - 1)


def brute_force_epsilon(scores, labels, delta, alpha):
    n_members, n_nonmembers = int(np.sum(labels == 1)), int(np.sum(labels == 0))
    best = 0.0
    for fp, tp in brute_force_operating_points(scores, labels):
        fpr_hi = clopper_pearson(fp, n_nonmembers, alpha)[1]
        fnr_hi = clopper_pearson(n_members - tp, n_members, alpha)[1]
        for numerator, denominator in ((1 - delta - fnr_hi, fpr_hi), (1 - delta - fpr_hi, fnr_hi)):
            if numerator > 0:
                best = max(best, math.log(numerator / denominator))
    return best


# Hand-computed cases.


def test_perfect_separation():
    scores, labels = separated(50, 1000)
    assert roc_auc(scores, labels) == 1.0
    assert best_balanced_accuracy(scores, labels) == 1.0
    assert advantage(scores, labels) == 1.0
    for fpr in (0.001, 0.01, 0.1):
        assert tpr_at_fpr(scores, labels, fpr).value == 1.0
    fpr, tpr, _ = roc_curve(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert tpr[fpr == 0.0].max() == 1.0


def test_perfectly_inverted():
    scores, labels = separated(50, 1000, inverted=True)
    assert roc_auc(scores, labels) == 0.0
    assert best_balanced_accuracy(scores, labels) == 0.5  # direction is fixed: no credit for flipping
    assert advantage(scores, labels) == 0.0
    assert tpr_at_fpr(scores, labels, 0.01).value == 0.0


def test_all_ties():
    scores, labels = np.full(10, 3.0), np.array([1, 0] * 5)
    fpr, tpr, thresholds = roc_curve(scores, labels)
    np.testing.assert_array_equal(fpr, [0.0, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 1.0])
    np.testing.assert_array_equal(thresholds, [np.inf, 3.0])
    assert roc_auc(scores, labels) == 0.5
    assert best_balanced_accuracy(scores, labels) == 0.5
    assert advantage(scores, labels) == 0.0
    np.testing.assert_array_equal(rank_normalise(scores), np.full(10, 0.5))


def test_hand_worked_roc_with_ties():
    # member 0.9 | member 0.8 tied with non-member 0.8 | two non-members 0.5 | member 0.3
    scores = np.array([0.9, 0.8, 0.8, 0.5, 0.5, 0.3])
    labels = np.array([1, 1, 0, 0, 0, 1])
    fpr, tpr, thresholds = roc_curve(scores, labels)
    np.testing.assert_array_equal(thresholds, [np.inf, 0.9, 0.8, 0.5, 0.3])
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 1, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1])
    # Pairs won: 0.9 beats 3, 0.8 beats 2 and ties 1, 0.3 beats 0 -> 5.5 / 9
    assert roc_auc(scores, labels) == pytest.approx(11 / 18, abs=1e-15)
    assert advantage(scores, labels) == pytest.approx(1 / 3)
    assert best_balanced_accuracy(scores, labels) == pytest.approx(2 / 3)


def test_tpr_at_fpr_hand_case():
    # 10 non-members: FPR 0.1 allows 1 false positive, 0.2 allows 2.
    members = [10, 8, 5, 5, 5]
    nonmembers = [9, 8, 4, 3, 2, 1, 0, -1, -2, -3]
    scores = np.array(members + nonmembers, float)
    labels = np.array([1] * 5 + [0] * 10)
    # At FPR 0.1: 10 (member) and 9 (non-member) pass; the tie at 8 would add a second false positive.
    result = tpr_at_fpr(scores, labels, 0.1)
    assert result.value == pytest.approx(1 / 5)
    assert (result.ci_low, result.ci_high) == pytest.approx(clopper_pearson(1, 5))
    assert result.reason is None
    # At FPR 0.2: the tie at 8 and the three members at 5 pass with 2 false positives.
    assert tpr_at_fpr(scores, labels, 0.2).value == 1.0
    refused = tpr_at_fpr(scores, labels, 0.05)
    assert refused == TprAtFpr(None, None, None, "needs >= 20 non-members, have 10")


def test_refuses_tpr_at_low_fpr_with_too_few_nonmembers():
    scores, labels = separated(400, 400)
    result = tpr_at_fpr(scores, labels, 0.001)
    assert result.value is None and result.ci_low is None and result.ci_high is None
    assert result.reason == "needs >= 1000 non-members, have 400"
    metrics = evaluate_attack(scores, labels)
    assert metrics["tpr_at_fpr"] == {"0.001": None, "0.01": 1.0}
    assert metrics["tpr_at_fpr_ci"]["0.001"] is None
    assert metrics["tpr_at_fpr_note"] == {"0.001": "needs >= 1000 non-members, have 400", "0.01": None}
    # Exactly 1 / fpr non-members is enough.
    assert tpr_at_fpr(*separated(5, 1000), 0.001).value == 1.0


@pytest.mark.parametrize("n", [1, 7, 50, 1000])
@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_clopper_pearson_matches_scipy_binomtest(n, alpha):
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        expected = stats.binomtest(k, n).proportion_ci(confidence_level=1 - alpha, method="exact")
        low, high = clopper_pearson(k, n, alpha)
        assert low == pytest.approx(expected.low, abs=1e-12)
        assert high == pytest.approx(expected.high, abs=1e-12)
    assert clopper_pearson(0, n, alpha)[0] == 0.0
    assert clopper_pearson(n, n, alpha)[1] == 1.0


def test_clopper_pearson_known_value():
    # k = 0: the upper end solves (1 - p)^n = alpha / 2.
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 1 - 0.025 ** (1 / 10)), abs=1e-12)
    assert clopper_pearson(10, 10) == pytest.approx((0.025 ** (1 / 10), 1.0), abs=1e-12)


# Random data and cross-checks.


def test_random_scores_give_chance_auc_and_no_epsilon():
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=4000), rng.integers(0, 2, 4000)
    auc = roc_auc(scores, labels)
    low, high = auc_confidence_interval(scores, labels)
    assert abs(auc - 0.5) < 0.03
    assert low < 0.5 < high
    assert empirical_epsilon_lower_bound(scores, labels) < 0.2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_epsilon_lower_bound_below_randomized_response_epsilon(seed):
    scores, labels = randomized_response(1.0, 3000, seed)
    bound = empirical_epsilon_lower_bound(scores, labels)
    assert 0.5 < bound <= 1.0
    assert empirical_epsilon_lower_bound(scores, labels, delta=0.05) < bound


def brute_force_epsilon_at(scores, labels, threshold, delta, alpha):
    """The bound at one fixed threshold, counted record by record."""
    fp = sum(1 for s, y in zip(scores, labels) if s >= threshold and y == 0)
    fn = sum(1 for s, y in zip(scores, labels) if s < threshold and y == 1)
    fpr_hi = clopper_pearson(fp, int(np.sum(labels == 0)), alpha)[1]
    fnr_hi = clopper_pearson(fn, int(np.sum(labels == 1)), alpha)[1]
    candidates = [math.log(n / d) for n, d in ((1 - delta - fnr_hi, fpr_hi), (1 - delta - fpr_hi, fnr_hi)) if n > 0]
    return max([0.0, *candidates])


@pytest.mark.parametrize("seed", range(3))
def test_strict_epsilon_bound_uses_the_threshold_chosen_on_calibration_records(seed):
    calibration = random_with_ties(seed)
    scores, labels = random_with_ties(seed + 10)
    # the calibration threshold, by brute force: the operating point with the highest bound on those records
    cal_scores, cal_labels = calibration
    thresholds = sorted(set(cal_scores.tolist()), reverse=True)
    best = max(thresholds, key=lambda t: brute_force_epsilon_at(cal_scores, cal_labels, t, 1e-3, 0.05))
    expected = brute_force_epsilon_at(scores, labels, best, 1e-3, 0.05)
    got = empirical_epsilon_lower_bound(scores, labels, 1e-3, calibration=calibration)
    assert got == pytest.approx(expected, abs=1e-12)
    # calibrating on the evaluation records themselves is the nominal bound
    assert empirical_epsilon_lower_bound(scores, labels, 1e-3, calibration=(scores, labels)) == pytest.approx(
        empirical_epsilon_lower_bound(scores, labels, 1e-3), abs=1e-12)


def test_strict_epsilon_bound_holds_its_confidence_on_pure_noise_and_the_nominal_one_does_not():
    """No leakage (members and non-members score alike): a valid 95% bound exceeds 0 in at most ~5% of trials;
    choosing the threshold on the evaluation records (nominal) reports a positive epsilon more often (measured
    2.7% against 0%)."""
    rng = np.random.default_rng(0)
    trials, strict_positive, nominal_positive = 300, 0, 0
    labels = np.repeat([1, 0], 100)
    for _ in range(trials):
        calibration = (rng.normal(size=200), labels)
        scores = rng.normal(size=200)
        strict_positive += empirical_epsilon_lower_bound(scores, labels, calibration=calibration) > 0
        nominal_positive += empirical_epsilon_lower_bound(scores, labels) > 0
    assert strict_positive / trials <= 0.06
    assert nominal_positive > strict_positive


@pytest.mark.parametrize("seed", [0, 1])
def test_strict_epsilon_bound_still_detects_randomized_response(seed):
    calibration = randomized_response(1.0, 3000, seed + 100)
    scores, labels = randomized_response(1.0, 3000, seed)
    bound = empirical_epsilon_lower_bound(scores, labels, calibration=calibration)
    assert 0.5 < bound <= 1.0
    metrics = evaluate_attack(scores, labels, calibration=calibration)
    assert metrics["eps_lower_bound"] == bound and metrics["eps_lower_bound_threshold"] == "calibration"


@pytest.mark.parametrize("seed", range(4))
def test_fast_paths_match_brute_force(seed):
    scores, labels = random_with_ties(seed)
    points = brute_force_operating_points(scores, labels)
    n_members, n_nonmembers = int(labels.sum()), int((1 - labels).sum())
    fpr, tpr, _ = roc_curve(scores, labels)
    np.testing.assert_allclose(fpr, [fp / n_nonmembers for fp, _ in points])
    np.testing.assert_allclose(tpr, [tp / n_members for _, tp in points])
    assert roc_auc(scores, labels) == pytest.approx(brute_force_mann_whitney(scores, labels), abs=1e-12)
    assert auc_confidence_interval(scores, labels) == pytest.approx(brute_force_delong(scores, labels, 0.05))
    expected_advantage = max(tp / n_members - fp / n_nonmembers for fp, tp in points)
    assert advantage(scores, labels) == pytest.approx(expected_advantage, abs=1e-12)
    for target in (0.01, 0.1, 0.3):
        admissible = [tp for fp, tp in points if fp <= target * n_nonmembers]
        assert tpr_at_fpr(scores, labels, target).value == pytest.approx(max(admissible) / n_members)
    for delta in (0.0, 1e-3):
        assert empirical_epsilon_lower_bound(scores, labels, delta) == pytest.approx(
            brute_force_epsilon(scores, labels, delta, 0.05), abs=1e-12
        )
    np.testing.assert_allclose(rank_normalise(scores), brute_force_rank_normalise(scores), atol=1e-15)


@pytest.mark.parametrize("seed", range(3))
def test_roc_curve_matches_sklearn(seed):
    scores, labels = random_with_ties(seed, n=500, levels=30)
    expected_fpr, expected_tpr, expected_thresholds = sklearn_roc_curve(
        labels, scores, drop_intermediate=False
    )
    fpr, tpr, thresholds = roc_curve(scores, labels)
    np.testing.assert_allclose(fpr, expected_fpr)
    np.testing.assert_allclose(tpr, expected_tpr)
    np.testing.assert_array_equal(thresholds, expected_thresholds)


def test_torchmetrics_needs_rank_normalised_scores():
    """The DESIGN.md pitfall: torchmetrics squashes scores outside [0, 1] with a sigmoid."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    scores = np.round(rng.uniform(10, 1000, 400) + 200 * labels)  # AUC well above 0.5, integer ties
    exact = roc_auc(scores, labels)
    target = torch.from_numpy(labels)
    on_ranks = binary_auroc(torch.from_numpy(rank_normalise(scores)), target).item()
    on_raw = binary_auroc(torch.from_numpy(scores).float(), target).item()
    assert on_ranks == pytest.approx(exact, abs=1e-6)
    assert abs(on_raw - exact) > 0.2  # sigmoid(>= 17) == 1.0 in float32: nearly every score ties


def test_rank_normalise_keeps_order_and_ties():
    scores = np.array([5.0, -1e9, 5.0, 1e12, 0.0])
    ranks = rank_normalise(scores)
    np.testing.assert_allclose(ranks, [0.625, 0.0, 0.625, 1.0, 0.25])
    np.testing.assert_array_equal(rank_normalise([np.inf, -np.inf, 0.0]), [1.0, 0.0, 0.5])
    assert roc_auc(ranks, [1, 0, 0, 1, 0]) == roc_auc(scores, [1, 0, 0, 1, 0])


# The metrics.json contract and the torchmetrics class.


def test_evaluate_attack_contract():
    scores, labels = random_with_ties(0, n=2400, levels=50)
    metrics = evaluate_attack(scores, labels, delta=1e-5, fprs=(0.001, 0.01, 0.1))
    assert set(metrics) == {
        "auc", "accuracy", "advantage", "tpr_at_fpr", "eps_lower_bound", "n_members", "n_nonmembers",
        "auc_ci", "tpr_at_fpr_ci", "tpr_at_fpr_note", "eps_lower_bound_threshold",
    }  # fmt: skip
    assert list(metrics["tpr_at_fpr"]) == ["0.001", "0.01", "0.1"]
    assert json.loads(json.dumps(metrics)) == metrics
    for key in ("auc", "accuracy", "advantage", "eps_lower_bound"):
        assert type(metrics[key]) is float
    assert type(metrics["n_members"]) is int and metrics["n_members"] + metrics["n_nonmembers"] == 2400
    assert all(type(v) is float for v in metrics["auc_ci"])
    assert metrics["auc"] == roc_auc(scores, labels)
    assert metrics["accuracy"] == pytest.approx(best_balanced_accuracy(scores, labels))
    assert metrics["eps_lower_bound"] == empirical_epsilon_lower_bound(scores, labels, delta=1e-5)
    low, high = metrics["tpr_at_fpr_ci"]["0.01"]
    assert low <= metrics["tpr_at_fpr"]["0.01"] <= high
    assert [fpr_key(f) for f in (0.001, 0.01, 0.1, np.float64(1e-4))] == ["0.001", "0.01", "0.1", "0.0001"]


def test_membership_metrics_accumulates_batches():
    scores, labels = random_with_ties(1, n=300)
    metric = MembershipMetrics(delta=1e-5, fprs=(0.01,))
    for chunk in np.array_split(np.arange(300), 3):
        metric.update(torch.from_numpy(scores[chunk]).float(), torch.from_numpy(labels[chunk]))
    assert metric.compute() == evaluate_attack(scores, labels, delta=1e-5, fprs=(0.01,))
    metric.reset()
    with pytest.raises(ValueError, match="before any update"), pytest.warns(UserWarning, match="before the"):
        metric.compute()
    with pytest.raises(ValueError, match="0 \\(non-member\\) or 1"):
        metric.update(torch.tensor([0.1, 0.2]), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        metric.update(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))


# Bad input.


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        ([0.1, float("nan"), 0.3], [0, 1, 1], "1 NaN values"),
        ([0.1, float("inf"), 0.3], [0, 1, 1], "infinite values; map them with rank_normalise"),
        ([0.1, 0.2, 0.3], [1, 1, 1], "got 3 members and 0 non-members"),
        ([], [], "got 0 members and 0 non-members"),
        ([0.1, 0.2, 0.3], [0, 1], "differ in length: 3 vs 2"),
        ([0.1, 0.2, 0.3], [0, 1, 2], "labels must be 0 \\(non-member\\) or 1"),
        ([0.1, 0.2], [-1.0, 1.0], "labels must be 0 \\(non-member\\) or 1"),
        ([[0.1, 0.2]], [[0, 1]], "must be 1-D"),
        (["a", "b"], [0, 1], "scores must be numeric"),
    ],
)
def test_rejects_bad_scores_and_labels(scores, labels, message):
    for metric in (roc_curve, roc_auc, advantage, best_balanced_accuracy, empirical_epsilon_lower_bound,
                   evaluate_attack):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            metric(scores, labels)


def test_rejects_bad_parameters():
    scores, labels = separated(5, 5)
    for bad_fpr in (0.0, 1.0, -0.1, 2):
        with pytest.raises(ValueError, match="fpr must be in \\(0, 1\\)"):
            tpr_at_fpr(scores, labels, bad_fpr)
    with pytest.raises(ValueError, match="alpha must be in \\(0, 1\\)"):
        auc_confidence_interval(scores, labels, alpha=1.0)
    with pytest.raises(ValueError, match="delta must be in \\[0, 1\\)"):
        empirical_epsilon_lower_bound(scores, labels, delta=-0.1)
    with pytest.raises(ValueError, match="fpr must be in"):
        evaluate_attack(scores, labels, fprs=(0.01, 1.5))
    with pytest.raises(ValueError, match=">= 2 members and >= 2 non-members, got 1 and 3"):
        auc_confidence_interval([0.9, 0.1, 0.2, 0.3], [1, 0, 0, 0])
    assert evaluate_attack([0.9, 0.1, 0.2, 0.3], [1, 0, 0, 0])["auc_ci"] is None
    for k, n in ((3, 2), (-1, 5), (0, 0), (1.5, 3), (True, 3)):
        with pytest.raises(ValueError, match="k and n must be integers|need n >= 1"):
            clopper_pearson(k, n)
    with pytest.raises(ValueError, match="NaN"):
        rank_normalise([1.0, float("nan")])
