import copy
import math
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.progress import Progress
from sklearn.datasets import load_digits
from torch import nn

from mia_lightning.attacks import (
    ATTACKS,
    Attack,
    AttackNetwork,
    BlackboxAttack,
    ComponentInput,
    GradientComponent,
    ThresholdAttack,
    UnsupervisedAttack,
    WhiteboxAttack,
    available_attacks,
    balanced_threshold,
    build_attack,
    confidence_logit,
    log_probabilities,
    membership_signals,
    modified_entropy,
    prediction_entropy,
)
from mia_lightning.attacks.training import (
    BestEpochModule,
    RecordBatches,
    StratifiedBatchSampler,
    held_out_split,
    torch_threads,
)
from mia_lightning.features import FeatureSet, FeatureSpec, extract_whitebox_features
from mia_lightning.metrics import roc_auc
from mia_lightning.models import build_model

NEURAL = ("blackbox_nn", "whitebox", "whitebox_multi_epoch", "unsupervised")
THRESHOLD = ("loss", "confidence", "entropy", "modified_entropy")
N_MEMBERS = 300


def fast_attack(name: str, **kwargs) -> Attack:
    """The registered attack with its default settings, minus progress bars."""
    training = {"progress": False, "accelerator": "cpu"} if name in NEURAL else {}
    return build_attack(name, **{**training, **kwargs})


def subset(features: FeatureSet, rows: slice) -> FeatureSet:
    return FeatureSet(features.index(rows))


def union(*sets: FeatureSet) -> FeatureSet:
    return FeatureSet({name: torch.cat([s[name] for s in sets]) for name in sets[0].names})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny attack networks run ~10x slower with 2 threads on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target():
    """An MLP that memorises 300 digits with RANDOM labels (100% train, chance test accuracy): it leaks.

    Snapshots after 50, 150 and 300 full-batch steps feed the multi-snapshot attack.
    """
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(1))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    members, unseen = order[:N_MEMBERS], order[N_MEMBERS:]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("fc", 10, (64,), widths=(128,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    snapshots = []
    for step in range(1, 301):
        optimizer.zero_grad()
        F.cross_entropy(model(x[members]), y[members]).backward()
        optimizer.step()
        if step in (50, 150, 300):
            snapshots.append(copy.deepcopy(model))
    assert (model(x[members]).argmax(1) == y[members]).all()
    spec = FeatureSpec(outputs=("output", "log_output"), gradients=("fc2",), loss=True, label=True)

    def features(indices: torch.Tensor) -> FeatureSet:
        return extract_whitebox_features(snapshots, (x[indices], y[indices]), spec)

    return model, features, members, unseen


@pytest.fixture(scope="module")
def overfit_sets(target):
    """(known members, known non-members, evaluation members, evaluation non-members), 150 each."""
    _, features, members, unseen = target
    member_features, nonmember_features = features(members), features(unseen[:N_MEMBERS])
    half = N_MEMBERS // 2
    return (
        subset(member_features, slice(0, half)),
        subset(nonmember_features, slice(0, half)),
        subset(member_features, slice(half, None)),
        subset(nonmember_features, slice(half, None)),
    )


@pytest.fixture(scope="module")
def null_sets(target):
    """The same four sets, every record unseen by the model: 200 / 200 known, about 550 / 550 evaluated.

    Under the null the AUC's standard deviation is ~0.017 here, so +-0.06 is a 3.4-sigma band.
    """
    _, features, _, unseen = target
    pool = features(unseen)
    middle = 400 + (len(unseen) - 400) // 2
    return (
        subset(pool, slice(0, 200)),
        subset(pool, slice(200, 400)),
        subset(pool, slice(400, middle)),
        subset(pool, slice(middle, None)),
    )


def labels_of(members: FeatureSet, nonmembers: FeatureSet) -> np.ndarray:
    return np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]


def evaluate(name: str, sets, model: nn.Module, **kwargs) -> tuple[float, Attack, np.ndarray]:
    """Fit on the known sets, score the evaluation members and non-members in two calls, as the audit does."""
    known_members, known_nonmembers, eval_members, eval_nonmembers = sets
    attack = fast_attack(name, **kwargs)
    attack.feature_spec(model)
    attack.fit(known_members, known_nonmembers)
    scores = np.concatenate([attack.score(eval_members), attack.score(eval_nonmembers)])
    assert scores.dtype == np.float64 and scores.shape == (len(eval_members) + len(eval_nonmembers),)
    return roc_auc(scores, labels_of(eval_members, eval_nonmembers)), attack, scores


@pytest.fixture(scope="module")
def loss_auc(target, overfit_sets) -> float:
    return evaluate("loss", overfit_sets, target[0])[0]


@pytest.mark.parametrize("name", THRESHOLD + NEURAL)
def test_attack_beats_chance_on_overfit_target(name, target, overfit_sets, loss_auc):
    auc, attack, scores = evaluate(name, overfit_sets, target[0])
    assert auc > 0.75, f"{name}: AUC {auc:.3f}"
    if name in NEURAL:
        # A network that reads the prediction and the label (hence the loss) must not do worse than the loss
        # threshold: the paper's softmax-fed, N(0, 0.01)-initialised blackbox_nn without the loss scored ~0.65 here.
        assert auc >= loss_auc - 0.03, f"{name}: AUC {auc:.3f}, the loss threshold {loss_auc:.3f}"
        # Not collapsed: the scores spread over more than rounding noise of their magnitude.
        assert np.std(scores) > 1e-2 * np.max(np.abs(scores)), f"{name}: scores {scores[:5]}"
    # Hard calls: the threshold fixed without the evaluation set, or the clusters of the records given
    # together, still separate it.
    members, nonmembers = overfit_sets[2:]
    calls = attack.predict(union(members, nonmembers))
    balanced_accuracy = (calls[: len(members)].mean() + (1 - calls[len(members) :].mean())) / 2
    assert calls.dtype == np.bool_ and balanced_accuracy > 0.6, f"{name}: balanced accuracy {balanced_accuracy:.3f}"


@pytest.mark.parametrize("name", THRESHOLD + NEURAL)
def test_attack_is_at_chance_when_neither_set_was_seen(name, target, null_sets):
    auc, _, _ = evaluate(name, null_sets, target[0])
    assert abs(auc - 0.5) < 0.06, f"{name}: AUC {auc:.3f} on a null target"


@pytest.mark.parametrize("name", available_attacks())
def test_a_records_score_does_not_depend_on_the_records_scored_with_it(name, target, overfit_sets):
    """Bit for bit: scoring members and non-members in two calls must rank them exactly as one call would.

    The unsupervised attack once scored AUC 1.0 from a collapsed embedding: its members and non-members,
    scored in separate batches, were rounded differently by the batched matrix products.
    """
    known_members, known_nonmembers, members, nonmembers = overfit_sets
    attack = fast_attack(name, max_epochs=2) if name in NEURAL else fast_attack(name)
    attack.feature_spec(target[0])
    attack.fit(known_members, known_nonmembers)
    apart = np.concatenate([attack.score(members), attack.score(nonmembers)])
    together = attack.score(union(members, nonmembers))
    np.testing.assert_array_equal(together, apart)
    order = torch.randperm(len(apart), generator=torch.Generator().manual_seed(0))
    shuffled = attack.score(FeatureSet(union(members, nonmembers).index(order)))
    np.testing.assert_array_equal(shuffled, apart[order.numpy()])
    one = attack.score(subset(nonmembers, slice(7, 8)))
    np.testing.assert_array_equal(one, apart[len(members) + 7 : len(members) + 8])


@pytest.mark.parametrize("name", NEURAL)
def test_scores_that_differ_by_float_noise_alone_tie(name, monkeypatch, target, overfit_sets):
    """A network collapsed to a constant whose outputs differ only in the last bit, in step with membership
    (here: with the loss), must give tied scores and a warning, not a confident AUC.
    """

    def collapsed(self: AttackNetwork, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        zero = sum(p.sum() for p in self.parameters()) * 0.0  # keeps the output differentiable for training
        constant = torch.full((len(batch["loss"]),), 1e-3)
        one_ulp_up = torch.nextafter(constant, torch.ones_like(constant))
        return torch.where(batch["loss"][:, -1, 0] < 0.1, one_ulp_up, constant) + zero

    monkeypatch.setattr(AttackNetwork, "forward", collapsed)
    with pytest.warns(UserWarning, match="collapsed to a constant"):
        auc, attack, scores = evaluate(name, overfit_sets, target[0], max_epochs=1)
    assert len(np.unique(scores)) == 1 and auc == 0.5
    # Unrounded, the last-bit differences would have ranked the records near-perfectly.
    members, nonmembers = overfit_sets[2:]
    last_bit = torch.cat([members["loss"], nonmembers["loss"]])[:, -1, 0] < 0.1
    assert roc_auc(last_bit.double().numpy(), labels_of(members, nonmembers)) > 0.9


def test_factorised_gradient_component_equals_conv_on_the_materialised_matrix():
    torch.manual_seed(0)
    n, snapshots, rows, out, kernels = 5, 3, 7, 4, 6
    component = GradientComponent(snapshots, rows, out, kernels, widths=(16, 8), dropout=0.2).double().eval()
    nn.init.normal_(component.conv.bias)
    activation = torch.randn(n, snapshots, rows, dtype=torch.float64)
    error = torch.randn(n, snapshots, out, dtype=torch.float64)
    matrix = activation[..., :, None] * error[..., None, :]  # dL/dW as (rows x out), one per snapshot
    torch.testing.assert_close(
        component.factorised_responses(activation, error), component.responses(matrix), rtol=1e-12, atol=1e-12
    )
    # The obvious definition: kernel k on row r of snapshot t, summed over snapshots, plus the bias.
    weight, bias = component.conv.weight[:, :, 0, :], component.conv.bias
    slow = torch.zeros(n, kernels, rows, dtype=torch.float64)
    for i in range(n):
        for k in range(kernels):
            for r in range(rows):
                slow[i, k, r] = bias[k] + sum(weight[k, t] @ matrix[i, t, r] for t in range(snapshots))
    torch.testing.assert_close(component.responses(matrix), slow, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(component(activation, error), component(matrix), rtol=1e-12, atol=1e-12)


def test_attack_network_shapes_and_paper_init():
    inputs = [
        ComponentInput("vector", ("loss",), (3,)),
        ComponentInput("factorised_gradient", ("grad/fc/activation", "grad/fc/error"), (3, 5, 4)),
        ComponentInput("gradient", ("grad/conv",), (3, 6, 2)),
    ]
    network = AttackNetwork(inputs, kernels=4, init_std=0.01)
    batch = {
        "loss": torch.rand(2, 3, 1),
        "grad/fc/activation": torch.rand(2, 3, 5),
        "grad/fc/error": torch.rand(2, 3, 4),
        "grad/conv": torch.rand(2, 3, 6, 2),
    }
    assert network(batch).shape == (2,)
    linear_weights = torch.cat([m.weight.flatten() for m in network.modules() if isinstance(m, nn.Linear)])
    assert abs(linear_weights.std().item() - 0.01) < 0.001
    assert all((m.bias == 0).all() for m in network.modules() if isinstance(m, nn.Linear | nn.Conv2d))
    assert [m.out_features for m in network.encoder if isinstance(m, nn.Linear)] == [256, 128, 64, 1]
    default_init = AttackNetwork(inputs, kernels=4)
    assert not all((m.bias == 0).all() for m in default_init.modules() if isinstance(m, nn.Linear))


def test_input_scaling_standardises_with_the_training_records_statistics():
    inputs = [
        ComponentInput("vector", ("loss",), (2,), log_scale=True),
        ComponentInput("vector", ("label",), (3,)),
        ComponentInput("factorised_gradient", ("grad/fc/activation", "grad/fc/error"), (1, 5, 4)),
    ]
    generator = torch.Generator().manual_seed(0)
    records = {
        "loss": torch.rand(30, 2, 1, generator=generator) * 1e-3,
        "label": F.one_hot(torch.tensor([0, 1] * 15), 3).float(),  # class 2 never occurs: constant 0
        "grad/fc/activation": torch.randn(30, 1, 5, generator=generator) * 7,
        "grad/fc/error": torch.randn(30, 1, 4, generator=generator) * 1e-4,
    }
    network = AttackNetwork(inputs, kernels=4)
    network.fit_input_scaling({k: v[i : i + 7] for k, v in records.items()} for i in range(0, 30, 7))
    loss, label, activation, error = (scaling for group in network.scalings for scaling in group)
    log_loss = records["loss"].flatten(1).double().log()
    torch.testing.assert_close(loss.shift, log_loss.mean(0).float())
    torch.testing.assert_close(loss.scale, log_loss.std(0, correction=0).float())
    torch.testing.assert_close(label.shift, torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(label.scale, torch.tensor([0.5, 0.5, 1.0]))  # the constant class is left as is
    assert activation.shift == 0 and error.shift == 0
    torch.testing.assert_close(activation.scale, records["grad/fc/activation"].pow(2).mean().sqrt())
    torch.testing.assert_close(error.scale, records["grad/fc/error"].pow(2).mean().sqrt())
    # The network reads each input standardised: a loss of exactly 0 (below float32) is finite.
    standardised = loss(network._raw_inputs(inputs[0], records)[0])
    expected = (log_loss - log_loss.mean(0)) / log_loss.std(0, correction=0)
    torch.testing.assert_close(standardised.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(network({**records, "loss": torch.zeros(30, 2, 1)})).all()


def test_modified_entropy_matches_hand_computed_value():
    probs = [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]
    log_probs = torch.tensor(probs, dtype=torch.float64).log()
    targets = torch.tensor([0, 1])
    first = -(0.3 * math.log(0.7) + 0.2 * math.log(0.8) + 0.1 * math.log(0.9))
    second = -(0.9 * math.log(0.1) + 0.1 * math.log(0.9) + 0.8 * math.log(0.2))
    torch.testing.assert_close(modified_entropy(log_probs, targets), torch.tensor([first, second], dtype=torch.float64))
    # p = 0 exactly (a -inf logit) stays finite, and a confident correct prediction has ~0 Mentr.
    saturated = modified_entropy(torch.tensor([[0.0, -math.inf], [-math.inf, 0.0]]), torch.tensor([0, 0]))
    assert torch.isfinite(saturated).all() and saturated[0] == 0 and saturated[1] > 60


def test_signal_functions_match_obvious_loops():
    generator = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(20, 6, generator=generator, dtype=torch.float64) * 3, dim=1)
    targets = torch.randint(0, 6, (20,), generator=generator)
    for i in range(20):
        p, y = log_probs[i].double().exp().tolist(), int(targets[i])
        mentr = -(1 - p[y]) * math.log(p[y]) - sum(p[c] * math.log(1 - p[c]) for c in range(6) if c != y)
        assert modified_entropy(log_probs, targets)[i].item() == pytest.approx(mentr, rel=1e-9)
        assert prediction_entropy(log_probs)[i].item() == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-9)
        logit = math.log(p[y]) - math.log(1 - p[y])
        assert confidence_logit(log_probs, targets)[i].item() == pytest.approx(logit, rel=1e-9, abs=1e-9)


def test_log_probabilities_stay_exact_for_confident_predictions():
    # Logits (m, 0, 0): p_0 = 1 / (1 + 2 e^-m), 1 - p_0 = 2 e^-m / (1 + 2 e^-m), exact in float64 via log1p.
    margins = [5.0, 30.0, 40.0, 300.0]
    stored = torch.log_softmax(torch.tensor([[m, 0.0, 0.0] for m in margins]), dim=1)  # a float32 model's
    assert stored[1:, 0].tolist() == [0.0, 0.0, 0.0]  # log p_0 itself has rounded to 0
    log_p, log_complement = log_probabilities(stored)
    for i, m in enumerate(margins):
        log_normaliser = math.log1p(2 * math.exp(-m))  # log(1 + 2 e^-m)
        assert log_p[i, 0].item() == pytest.approx(-log_normaliser, rel=1e-6)
        assert log_complement[i, 0].item() == pytest.approx(math.log(2) - m - log_normaliser, rel=1e-6)
        assert log_complement[i, 1].item() == pytest.approx(math.log1p(-math.exp(-m - log_normaliser)), rel=1e-6)


def margin_features(margins: list[float]) -> FeatureSet:
    """Features a float32 model gives to records with logits (m, 0, 0) and label 0."""
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(1, 3)))
    with torch.no_grad():
        model.fc1.weight.copy_(torch.tensor([[1.0], [0.0], [0.0]]))
        model.fc1.bias.zero_()
    x, y = torch.tensor(margins).reshape(-1, 1), torch.zeros(len(margins), dtype=torch.long)
    return extract_whitebox_features(model, (x, y), FeatureSpec(outputs=("output", "log_output")))


# The textbook formulas on float32 softmax probabilities (label 0), as scores: higher = more member.
NAIVE_FLOAT32 = {
    "loss": lambda p: p[:, 0].log(),
    "confidence": lambda p: p[:, 0],
    "entropy": lambda p: (p * p.clamp_min(1e-30).log()).sum(1),
    "modified_entropy": lambda p: (
        (1 - p[:, 0]) * p[:, 0].clamp_min(1e-30).log() + (p[:, 1:] * (1 - p[:, 1:]).clamp_min(1e-30).log()).sum(1)
    ),
}


@pytest.mark.parametrize("name", THRESHOLD)
def test_threshold_signals_keep_confident_predictions_apart(name):
    """Logit margins 30 vs 40 (and 120 vs 140): naive float32 signals tie them, ours rank the larger margin higher.

    The loss feature itself is float32, exact down to its smallest subnormal (margin ~103): past that it ties too.
    """
    close, far = margin_features([30.0, 40.0]), margin_features([120.0, 140.0])
    naive_close, naive_far = (NAIVE_FLOAT32[name](f["output/output"][:, -1]) for f in (close, far))
    assert naive_far[0] == naive_far[1]
    if name != "entropy":  # the entropy keeps p_j = e^-30 of the other classes, so it ties only further out
        assert naive_close[0] == naive_close[1]
    attack = fast_attack(name).fit(margin_features([40.0, 45.0]), margin_features([5.0, 30.0]))
    for features in (close,) if name == "loss" else (close, far):
        scores = attack.score(features)
        assert np.isfinite(scores).all() and scores[1] > scores[0], f"{name}: {scores}"


def threshold_features(losses: list[float]) -> FeatureSet:
    n = len(losses)
    return FeatureSet({"loss": torch.tensor(losses).reshape(n, 1, 1), "target": torch.zeros(n, dtype=torch.long)})


def test_threshold_is_chosen_on_the_known_sets():
    attack = ThresholdAttack("loss").fit(threshold_features([0.1, 0.2, 0.9]), threshold_features([0.5, 1.0, 2.0]))
    # Scores are -loss. The best balanced accuracy admits the two lowest member losses: score >= -0.2, and the
    # next lower score is -0.5, so the threshold sits at the midpoint.
    assert attack.threshold_ == pytest.approx(-0.35)
    assert attack.predict(threshold_features([0.3, 0.4, 0.6])).tolist() == [True, False, False]
    np.testing.assert_array_equal(attack.score(threshold_features([0.25])), [-0.25])


@pytest.mark.parametrize("seed", range(5))
def test_balanced_threshold_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    labels[:2] = [0, 1]
    scores = rng.integers(0, 15, 60) + 3.0 * labels  # ties on purpose
    threshold = balanced_threshold(scores, labels)

    def balanced_accuracy(t: float) -> float:
        calls = scores >= t
        return (calls[labels == 1].mean() + (1 - calls[labels == 0].mean())) / 2

    distinct = np.unique(scores)
    candidates = [np.inf, distinct[0], *((distinct[1:] + distinct[:-1]) / 2)]
    assert balanced_accuracy(threshold) == pytest.approx(max(balanced_accuracy(t) for t in candidates))


def test_balanced_threshold_edge_cases():
    assert balanced_threshold(np.array([0.0, 1.0, 2.0, 3.0]), np.array([1, 1, 0, 0])) == np.inf  # inverted
    assert balanced_threshold(np.array([0.0, 1.0, 2.0, 3.0]), np.array([0, 0, 1, 1])) == 1.5


def test_stratified_batches_are_balanced_and_cover_every_record():
    members, nonmembers = torch.arange(10), torch.arange(10, 13)
    sampler = StratifiedBatchSampler([members, nonmembers], batch_size=4, seed=0)
    epoch = list(sampler)
    assert len(epoch) == len(sampler) == 5
    for batch in epoch:
        assert (batch < 10).sum() == 2 and (batch >= 10).sum() == 2
    assert set(torch.cat(epoch).tolist()) == set(range(13))
    again = list(StratifiedBatchSampler([members, nonmembers], batch_size=4, seed=0))
    assert all(torch.equal(a, b) for a, b in zip(epoch, again))
    assert not all(torch.equal(a, b) for a, b in zip(epoch, list(sampler)))  # a new shuffle each epoch
    with pytest.raises(ValueError, match="multiple"):
        StratifiedBatchSampler([members, nonmembers], batch_size=5, seed=0)


def test_record_batches_keep_the_order_asked_for():
    first = {"a": torch.arange(6.0).reshape(3, 2)}
    second = {"a": torch.arange(6.0, 10.0).reshape(2, 2)}
    records = RecordBatches([first, second], torch.arange(5))
    indices = torch.tensor([4, 0, 3, 2])
    features, targets = records[indices]
    everything = torch.cat([first["a"], second["a"]])
    torch.testing.assert_close(features["a"], everything[indices])
    assert targets.tolist() == [4, 0, 3, 2]


def test_held_out_split_is_stratified_and_disjoint():
    groups = [torch.arange(10), torch.arange(10, 15)]
    train, validation = held_out_split(groups, 0.2, seed=0)
    assert [len(v) for v in validation] == [2, 1] and [len(t) for t in train] == [8, 4]
    for group, t, v in zip(groups, train, validation):
        assert sorted(torch.cat([t, v]).tolist()) == group.tolist()


def test_best_epoch_module_restores_the_best_weights():
    class Toy(BestEpochModule):
        def __init__(self):
            super().__init__(maximize=True)
            self.weight = nn.Parameter(torch.zeros(2))

    toy = Toy()
    toy.weight.data.fill_(1.0)
    toy.keep_if_best(0.7)
    toy.weight.data.fill_(2.0)
    toy.keep_if_best(0.6)  # worse: not kept
    toy.restore_best()
    assert toy.weight.tolist() == [1.0, 1.0] and toy.best_value == 0.7


def test_registry_names_and_default_feature_specs(target):
    model = target[0]
    assert available_attacks() == [
        "loss",
        "confidence",
        "entropy",
        "modified_entropy",
        "blackbox_nn",
        "whitebox",
        "whitebox_multi_epoch",
        "unsupervised",
    ]
    assert set(available_attacks()) == set(THRESHOLD + NEURAL)  # what the parametrised tests above cover
    assert build_attack("whitebox").feature_spec(model) == FeatureSpec(("log_output",), ("fc2",), True, True)
    assert build_attack("blackbox_nn").feature_spec(model) == FeatureSpec(("log_output",), (), True, True)
    assert build_attack("loss").feature_spec(model) == FeatureSpec((), (), True, False)
    assert build_attack("entropy").feature_spec(model) == FeatureSpec(("log_output",), (), False, False)
    paper = build_attack("blackbox_nn", outputs=["output"], init_std=0.01).feature_spec(model)
    assert paper == FeatureSpec(("output",), (), True, True)
    cnn = build_model("cnn", 10, (1, 8, 8))
    assert build_attack("unsupervised").feature_spec(cnn).gradients == ("fc2",)
    chosen = build_attack("whitebox", gradients=["fc1", "fc2"], outputs=["output", "fc1"]).feature_spec(model)
    assert chosen.gradients == ("fc1", "fc2") and chosen.outputs == ("output", "fc1")
    assert build_attack("whitebox").name == "whitebox" and build_attack("loss").name == "loss"
    assert build_attack("whitebox", name="whitebox_fc1", gradients=["fc1"]).name == "whitebox_fc1"
    assert ATTACKS["whitebox_multi_epoch"].cls is WhiteboxAttack and ATTACKS["blackbox_nn"].cls is BlackboxAttack
    assert isinstance(build_attack("unsupervised"), UnsupervisedAttack)


def test_bad_attack_names_and_arguments_are_refused(target):
    with pytest.raises(ValueError, match="unknown attack 'lira'.*loss, confidence.*unsupervised"):
        build_attack("lira")
    with pytest.raises(ValueError, match="does not take \\['epochs'\\].*max_epochs"):
        build_attack("whitebox", epochs=3)
    with pytest.raises(ValueError, match="does not take \\['gradients'\\]"):
        build_attack("blackbox_nn", gradients=["fc2"])
    with pytest.raises(ValueError, match="reads only the prediction vector"):
        build_attack("blackbox_nn", outputs=["output", "fc1"])
    with pytest.raises(ValueError, match="num_threads must be a positive int"):
        build_attack("whitebox", num_threads=0)
    with pytest.raises(ValueError, match="batch_size must be even"):
        build_attack("whitebox", batch_size=63)
    with pytest.raises(ValueError, match="kernels must be a positive int"):
        build_attack("whitebox", kernels=0)
    with pytest.raises(ValueError, match="outputs must be a sequence"):
        build_attack("whitebox", outputs="output")
    with pytest.raises(ValueError, match="gradient layer"):
        build_attack("unsupervised", gradients=[])
    with pytest.raises(ValueError, match="unknown output layer"):
        build_attack("whitebox", outputs=["fc9"]).feature_spec(target[0])
    with pytest.raises(ValueError, match="unknown signal"):
        ThresholdAttack("margin")


def test_bad_features_are_refused(target, overfit_sets):
    model = target[0]
    known_members, known_nonmembers, eval_members, _ = overfit_sets
    with pytest.raises(ValueError, match="call feature_spec\\(model\\)"):
        fast_attack("whitebox").fit(known_members, known_nonmembers)
    with pytest.raises(ValueError, match="at least 2 known members"):
        fast_attack("loss").fit(subset(known_members, slice(0, 1)), known_nonmembers)
    with pytest.raises(ValueError, match="at least 2 known members"):
        fast_attack("whitebox", gradients=["fc2"]).fit(known_members, subset(known_nonmembers, slice(0, 1)))
    with pytest.raises(ValueError, match="must be a FeatureSet"):
        fast_attack("loss").fit(dict(known_members.items()), known_nonmembers)
    for name in ("confidence", "whitebox", "unsupervised"):
        with pytest.raises(ValueError, match="not fitted"):
            fast_attack(name, **({} if name == "confidence" else {"gradients": ["fc2"]})).score(eval_members)
    with pytest.raises(ValueError, match="needs features \\['grad/fc1'\\]"):
        fast_attack("whitebox", gradients=["fc1"]).fit(known_members, known_nonmembers)
    with pytest.raises(ValueError, match="reads every snapshot and needs at least 2"):
        last_only = FeatureSet({n: t[:, -1:] if n not in ("label", "target") else t for n, t in known_members.items()})
        fast_attack("whitebox_multi_epoch", gradients=["fc2"]).fit(last_only, last_only)

    attack = fast_attack("whitebox", max_epochs=1)
    attack.feature_spec(model)
    attack.fit(known_members, known_nonmembers)
    no_gradient = FeatureSet({n: t for n, t in eval_members.items() if not n.startswith("grad/")})
    with pytest.raises(ValueError, match="needs features \\['grad/fc2'\\]"):
        attack.score(no_gradient)
    materialised = {n: t for n, t in eval_members.items() if not n.startswith("grad/")}
    activation, error = eval_members["grad/fc2/activation"], eval_members["grad/fc2/error"]
    materialised["grad/fc2"] = activation[..., :, None] * error[..., None, :]
    with pytest.raises(ValueError, match="fitted on features .*grad/fc2/activation\\+grad/fc2/error"):
        attack.score(FeatureSet(materialised))
    wider = {n: t for n, t in eval_members.items()}
    log_probs = eval_members["output/log_output"]
    wider["output/log_output"] = torch.cat([log_probs, torch.full((*log_probs.shape[:2], 3), -50.0)], dim=2)
    with pytest.raises(ValueError, match="fitted on features"):
        attack.score(FeatureSet(wider))
    confidence = fast_attack("confidence").fit(known_members, known_nonmembers)
    with pytest.raises(ValueError, match="fitted on 10-class predictions, got 13"):
        confidence.score(FeatureSet(wider))
    unsupervised = fast_attack("unsupervised", max_epochs=1, gradients=["fc2"]).fit(known_members, known_nonmembers)
    assert unsupervised.score(subset(eval_members, slice(0, 1))).shape == (1,)
    with pytest.raises(ValueError, match="needs at least 4"):
        unsupervised.predict(subset(eval_members, slice(0, 3)))


def test_seeded_training_is_reproducible_and_leaves_global_state_alone(overfit_sets):
    known_members, known_nonmembers, eval_members, _ = overfit_sets
    rng_state, deterministic = torch.get_rng_state(), torch.are_deterministic_algorithms_enabled()
    for name in ("whitebox", "unsupervised"):
        runs = [
            fast_attack(name, gradients=["fc2"], max_epochs=3, seed=seed).fit(known_members, known_nonmembers)
            for seed in (7, 7, 8)
        ]
        scores = [attack.score(eval_members) for attack in runs]
        np.testing.assert_array_equal(scores[0], scores[1])
        assert not np.array_equal(scores[0], scores[2])
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert torch.are_deterministic_algorithms_enabled() == deterministic


def test_multi_snapshot_attack_reads_every_snapshot(target, overfit_sets):
    attack = fast_attack("whitebox_multi_epoch", max_epochs=1)
    attack.feature_spec(target[0])
    attack.fit(*overfit_sets[:2])
    assert {spec.names: spec.shape for spec in attack.inputs_} == {
        ("output/log_output",): (30,),
        ("loss",): (3,),
        ("label",): (10,),
        ("grad/fc2/activation", "grad/fc2/error"): (3, 128, 10),
    }


def test_whitebox_attack_reads_materialised_conv_gradients():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(24, 1, 8, 8, generator=generator), torch.randint(0, 3, (24,), generator=generator)
    model = build_model("cnn", 3, (1, 8, 8), channels=(4,), hidden=8)
    attack = fast_attack("whitebox", gradients=["conv1"], max_epochs=2)
    features = extract_whitebox_features(model, (x, y), attack.feature_spec(model))
    attack.fit(subset(features, slice(0, 12)), subset(features, slice(12, None)))
    assert [spec.kind for spec in attack.inputs_][-1] == "gradient" and attack.inputs_[-1].shape == (1, 9, 4)
    assert attack.score(features).shape == (24,)


def test_membership_signals_of_the_unsupervised_attack(overfit_sets):
    members = overfit_sets[0]
    signals = membership_signals(members, ["fc2"])
    probs = members["output/output"][:, -1].double()
    gradient = members["grad/fc2/activation"][:, -1, :, None] * members["grad/fc2/error"][:, -1, None, :]
    torch.testing.assert_close(signals[:, 0], members["loss"][:, -1, 0].double().log())
    assert signals[:, 1].tolist() == [1.0] * len(members)  # memorised
    torch.testing.assert_close(signals[:, 2], confidence_logit(members["output/log_output"][:, -1], members["target"]))
    entropy = -(probs * probs.log()).sum(1) / math.log(10)
    torch.testing.assert_close(signals[:, 3], entropy.log(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(signals[:, 4], gradient.flatten(1).norm(dim=1).double().log(), rtol=1e-5, atol=1e-5)


def test_blackbox_attack_also_takes_the_papers_softmax(target, overfit_sets, loss_auc):
    auc, attack, _ = evaluate("blackbox_nn", overfit_sets, target[0], outputs=["output"])
    assert [spec.names for spec in attack.inputs_] == [("output/output",), ("loss",), ("label",)]
    assert auc >= loss_auc - 0.03


def test_attacks_restore_the_thread_count_they_change(overfit_sets):
    with torch_threads(2):
        assert torch.get_num_threads() == 2
        attack = fast_attack("whitebox", gradients=["fc2"], max_epochs=1).fit(*overfit_sets[:2])
        attack.score(overfit_sets[2])
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 1  # this module's fixture


def test_attack_progress_bar_nests_inside_an_open_one(overfit_sets):
    """The audit trains attacks while the target's progress bar is still open; Lightning's RichProgressBar
    cleared it, and the target's Trainer then failed in teardown ("pop from empty list")."""
    with Progress() as outer, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rich's "a live display is already active" notices, if any
        outer.add_task("target", total=1)
        fast_attack("blackbox_nn", max_epochs=1, progress=True).fit(*overfit_sets[:2])
    assert outer.live.console._live_stack == []
