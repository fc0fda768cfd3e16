"""The audit: extract features for the attacker's sets, train and score every attack, and record the results.

Used at the end of ``fit`` (``callbacks.MembershipAudit``) and by ``python -m mia_lightning attack --run``.
Features are extracted once per model for the union of what the attacks need, then each attack reads its part.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from mia_lightning.attacks import ATTACKS, Attack, build_attack
from mia_lightning.features import FeatureSet, FeatureSpec, extract_whitebox_features
from mia_lightning.metrics import evaluate_attack
from mia_lightning.run import RunFolder
from mia_lightning.snapshots import list_snapshots, load_snapshot, model_from_snapshot

DEFAULT_ATTACKS = (
    "loss", "confidence", "entropy", "modified_entropy", "blackbox_nn", "whitebox", "whitebox_multi_epoch",
    "unsupervised",
)
MULTI_SNAPSHOT = "whitebox_multi_epoch"
SCORES_FILE = "attack_scores.npz"
ATTACK_PARTS = ("attack_train_members", "attack_train_nonmembers", "attack_test_members", "attack_test_nonmembers")


def load_snapshot_models(run: RunFolder) -> list[tuple[int, nn.Module]]:
    """The run's parameter snapshots as ``(epoch, model)`` pairs in time order (none if it saved none)."""
    if not run.snapshots.is_dir():
        return []
    return [(load_snapshot(p).epoch, model_from_snapshot(p)) for p in list_snapshots(run.path)]


def default_delta(num_members: int) -> float:
    """1/N rounded down to a power of ten: the same delta DP-SGD uses by default, so arms compare."""
    return 10.0 ** math.floor(math.log10(1.0 / num_members))


def check_attack_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; available: {', '.join(sorted(ATTACKS))}")
    if len(set(names)) != len(names):
        raise ValueError(f"attacks are listed more than once: {list(names)}")


def union_spec(specs: Sequence[FeatureSpec]) -> FeatureSpec:
    """One extraction serves every attack: the union of what each needs."""
    outputs: list[str] = []
    gradients: list[str] = []
    for spec in specs:
        outputs += [o for o in spec.outputs if o not in outputs]
        gradients += [g for g in spec.gradients if g not in gradients]
    return FeatureSpec(
        outputs=tuple(outputs),
        gradients=tuple(gradients),
        loss=any(s.loss for s in specs),
        label=any(s.label for s in specs),
        factorise_linear=all(s.factorise_linear for s in specs),
    )


@dataclass
class AuditResult:
    attacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # (scores, labels)
    leakage_by_epoch: dict[str, Any] | None = None
    skipped: dict[str, str] = field(default_factory=dict)


def _extract(models: nn.Module | Sequence[nn.Module], datamodule, spec: FeatureSpec, progress: bool,
             chunk_size: int) -> dict[str, FeatureSet]:
    return {
        part: extract_whitebox_features(models, datamodule.part_dataloader(part), spec, chunk_size=chunk_size,
                                        progress=progress)
        for part in ATTACK_PARTS
    }


def check_audit_settings(model: nn.Module, attacks: Sequence[str], per_epoch_attacks: Sequence[str] = (),
                         attack_kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Refuse what the audit would refuse (unknown attacks, settings or layers of ``model``), before any work:
    the audit runs after training, and a typo found there costs the whole fit."""
    attack_kwargs = dict(attack_kwargs or {})
    check_attack_names(list(attacks))
    check_attack_names(list(per_epoch_attacks))
    if MULTI_SNAPSHOT in per_epoch_attacks:
        raise ValueError(f"{MULTI_SNAPSHOT} reads all snapshots at once; it cannot be scored per epoch")
    stray = sorted(set(attack_kwargs) - set(attacks) - set(per_epoch_attacks))
    if stray:
        raise ValueError(f"attack_kwargs given for attacks that do not run: {stray}")
    for name in {*attacks, *per_epoch_attacks}:
        build_configured_attack(name, attack_kwargs.get(name, {}), model, seed=0, progress=False)


def build_configured_attack(name: str, kwargs: Mapping[str, Any], model: nn.Module, seed: int,
                            progress: bool) -> tuple[Attack, FeatureSpec]:
    """The attack with the audit's seed and progress setting where it takes them, and the features it needs."""
    accepted = ATTACKS[name].parameters()
    shared = {k: v for k, v in (("seed", seed), ("progress", progress)) if k in accepted and k not in kwargs}
    attack = build_attack(name, **shared, **kwargs)
    return attack, attack.feature_spec(model)


def score_records(attack: Attack, members: FeatureSet, nonmembers: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
    """(scores, labels) of members then non-members under a fitted attack."""
    member_scores = np.asarray(attack.score(members), dtype=np.float64)
    nonmember_scores = np.asarray(attack.score(nonmembers), dtype=np.float64)
    labels = np.concatenate([np.ones(len(member_scores), np.int64), np.zeros(len(nonmember_scores), np.int64)])
    return np.concatenate([member_scores, nonmember_scores]), labels


def _fit_and_score(attack: Attack, features: Mapping[str, FeatureSet],
                   delta: float) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Fit on the attacker's known records, evaluate on the disjoint evaluation records. The empirical epsilon's
    threshold is chosen on the known records, so its bound on the evaluation records is strict."""
    attack.fit(features["attack_train_members"], features["attack_train_nonmembers"])
    known = score_records(attack, features["attack_train_members"], features["attack_train_nonmembers"])
    scores, labels = score_records(attack, features["attack_test_members"], features["attack_test_nonmembers"])
    return evaluate_attack(scores, labels, delta=delta, calibration=known), scores, labels


def run_audit(
    final_model: nn.Module,
    datamodule,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    snapshot_models: Sequence[tuple[int, nn.Module]] = (),
    attack_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    per_epoch_attacks: Sequence[str] = (),
    delta: float | None = None,
    seed: int = 0,
    chunk_size: int = 256,
    progress: bool = False,
) -> AuditResult:
    """Train and evaluate each attack on the datamodule's split.

    Args:
        final_model: the trained target (single-snapshot attacks read it).
        snapshot_models: ``(epoch, model)`` pairs in time order, for ``whitebox_multi_epoch`` and leakage vs epoch.
        per_epoch_attacks: single-snapshot attacks also scored at every snapshot (the paper's "later leaks more").
        delta: for the empirical epsilon lower bound; default ``default_delta(#members)``.
    """
    attack_kwargs = dict(attack_kwargs or {})
    check_audit_settings(final_model, attacks, per_epoch_attacks, attack_kwargs)
    split = datamodule.split
    if delta is None:
        delta = default_delta(len(split.members))
    result = AuditResult()
    final_model.eval()

    def build(name: str, model: nn.Module, show: bool = progress) -> tuple[Attack, FeatureSpec]:
        return build_configured_attack(name, attack_kwargs.get(name, {}), model, seed, show)

    single = [a for a in attacks if a != MULTI_SNAPSHOT]
    built = {a: build(a, final_model) for a in single}
    if single:
        features = _extract(final_model, datamodule, union_spec([spec for _, spec in built.values()]), progress,
                            chunk_size)
        for name in single:
            started = time.perf_counter()
            metrics, scores, labels = _fit_and_score(built[name][0], features, delta)
            metrics["seconds"] = round(time.perf_counter() - started, 3)
            result.attacks[name], result.scores[name] = metrics, (scores, labels)

    if MULTI_SNAPSHOT in attacks:
        if len(snapshot_models) < 2:
            result.skipped[MULTI_SNAPSHOT] = f"needs >= 2 parameter snapshots, the run has {len(snapshot_models)}"
        else:
            started = time.perf_counter()
            models = [m for _, m in snapshot_models]
            attack, spec = build(MULTI_SNAPSHOT, models[-1])
            features = _extract(models, datamodule, spec, progress, chunk_size)
            metrics, scores, labels = _fit_and_score(attack, features, delta)
            metrics["snapshot_epochs"] = [int(e) for e, _ in snapshot_models]
            metrics["seconds"] = round(time.perf_counter() - started, 3)
            result.attacks[MULTI_SNAPSHOT], result.scores[MULTI_SNAPSHOT] = metrics, (scores, labels)

    if per_epoch_attacks and len(snapshot_models) >= 2:
        aucs: dict[str, list[float]] = {a: [] for a in per_epoch_attacks}
        tprs: dict[str, list[float | None]] = {a: [] for a in per_epoch_attacks}
        for _, model in snapshot_models:
            at_epoch = {a: build(a, model, show=False) for a in per_epoch_attacks}
            features = _extract(model, datamodule, union_spec([spec for _, spec in at_epoch.values()]), False,
                                chunk_size)
            for name, (attack, _) in at_epoch.items():
                metrics, _, _ = _fit_and_score(attack, features, delta)
                aucs[name].append(metrics["auc"])
                tprs[name].append(metrics["tpr_at_fpr"].get("0.01"))
        result.leakage_by_epoch = {"epochs": [int(e) for e, _ in snapshot_models], "auc": aucs, "tpr_at_0.01": tprs}
    return result


def save_scores(path: Path, scores: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Every attack's evaluation scores, so ROC curves can be redrawn (e.g. all arms of a comparison together)."""
    arrays: dict[str, np.ndarray] = {}
    for name, (values, labels) in scores.items():
        arrays[f"{name}/scores"] = values
        arrays[f"{name}/labels"] = labels
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_scores(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with np.load(path, allow_pickle=False) as z:
        names = sorted({k.rsplit("/", 1)[0] for k in z.files})
        return {n: (z[f"{n}/scores"], z[f"{n}/labels"]) for n in names}


def write_audit_outputs(run: RunFolder, result: AuditResult, split_sizes: Mapping[str, int]) -> dict[str, Any]:
    """metrics.json ``attacks``, scores, plots/roc.png, plots/leakage_vs_epoch.png and report.md."""
    from mia_lightning.report import plot_roc, plot_series, write_report

    metrics = run.update_metrics(attacks=result.attacks)
    if result.leakage_by_epoch:
        metrics = run.update_metrics(leakage_by_epoch=result.leakage_by_epoch)
    scores_path = run.path / SCORES_FILE
    scores = {**(load_scores(scores_path) if scores_path.exists() else {}), **result.scores}
    save_scores(scores_path, scores)
    plot_roc(scores, run.plots / "roc.png", title=f"ROC: {run.name}")
    if result.leakage_by_epoch:
        lbe = result.leakage_by_epoch
        plot_series({a: (lbe["epochs"], v) for a, v in lbe["auc"].items()}, run.plots / "leakage_vs_epoch.png",
                    xlabel="epoch of the snapshot", ylabel="attack AUC", title="leakage vs epoch", chance=0.5)
    write_report(run.report, run.name, metrics, split_sizes, metrics.get("leakage_by_epoch"))
    return metrics


def record_audit(run: RunFolder, result: AuditResult, split_sizes: Mapping[str, int],
                 target: Mapping[str, Any]) -> dict[str, Any]:
    """Write the audit's outputs and print its table (and any skipped attack): what ``fit`` and ``attack`` show."""
    from mia_lightning.report import print_attack_table

    metrics = write_audit_outputs(run, result, split_sizes)
    print_attack_table(result.attacks, target, title=f"membership inference audit: {run.name}")
    for name, why in result.skipped.items():
        print(f"skipped {name}: {why}")
    return metrics
