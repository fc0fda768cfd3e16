"""Log an audit to W&B: metrics.json values as summary, a table per attack, log-log ROC, leakage vs epoch."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mia_lightning.metrics import roc_curve

MAX_ROC_POINTS = 400


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}/{k}", v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
        out[prefix] = value


def summary_values(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``target/train_acc``, ``attack/whitebox/auc``, ``attack/loss/tpr_at_fpr/0.01``, ...: numbers only."""
    out: dict[str, Any] = {}
    _flatten("target", {k: v for k, v in metrics.get("target", {}).items()}, out)
    for name, m in metrics.get("attacks", {}).items():
        _flatten(f"attack/{name}", {k: v for k, v in m.items() if k != "seconds"}, out)
    return out


def roc_points(scores: np.ndarray, labels: np.ndarray) -> list[list[float]]:
    """The exact ROC thinned to at most MAX_ROC_POINTS, keeping the low-FPR end dense (log-spaced)."""
    fpr, tpr, _ = roc_curve(scores, labels)
    if len(fpr) > MAX_ROC_POINTS:
        keep = np.unique(np.concatenate([
            np.round(np.geomspace(1, len(fpr) - 1, MAX_ROC_POINTS - 1)).astype(int), [0, len(fpr) - 1]
        ]))
        fpr, tpr = fpr[keep], tpr[keep]
    return [[float(f), float(t)] for f, t in zip(fpr, tpr)]


def log_audit(run, metrics: Mapping[str, Any], scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
              plots_dir: Path) -> None:
    """``run`` is an open ``wandb`` run (``WandbLogger.experiment`` or ``wandb.init(...)``)."""
    import wandb

    from mia_lightning.report import COLUMNS, attack_rows

    run.summary.update(summary_values(metrics))
    payload: dict[str, Any] = {
        "audit/attacks": wandb.Table(columns=list(COLUMNS), data=attack_rows(metrics.get("attacks", {})))
    }
    for name, (values, labels) in scores.items():
        table = wandb.Table(columns=["fpr", "tpr"], data=roc_points(values, labels))
        payload[f"roc/{name}"] = wandb.plot.line(table, "fpr", "tpr", title=f"ROC {name}")
    for png in ("roc.png", "leakage_vs_epoch.png"):
        if (plots_dir / png).exists():
            payload[f"plots/{png.removesuffix('.png')}"] = wandb.Image(str(plots_dir / png))
    lbe = metrics.get("leakage_by_epoch")
    if lbe:
        payload["leakage_vs_epoch"] = wandb.plot.line_series(
            xs=lbe["epochs"], ys=list(lbe["auc"].values()), keys=list(lbe["auc"]),
            title="attack AUC vs snapshot epoch", xname="epoch",
        )
    run.log(payload)
