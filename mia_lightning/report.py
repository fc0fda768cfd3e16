"""What a person reads after an audit: the printed table, log-log ROC plots, leakage against epoch, report.md."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mia_lightning.metrics import roc_curve
from mia_lightning.run import atomic_write_text

COLUMNS = ("attack", "AUC", "AUC 95% CI", "accuracy", "TPR@1%FPR", "TPR@0.1%FPR", "emp. eps")


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def attack_rows(attacks: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """One row per attack; TPR at an FPR the evaluation set cannot resolve shows as n/a, never as a number."""
    rows = []
    for name, m in attacks.items():
        ci = m.get("auc_ci")
        rows.append([
            name,
            _fmt(m["auc"]),
            f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "n/a",
            _fmt(m["accuracy"]),
            _fmt(m["tpr_at_fpr"].get("0.01")),
            _fmt(m["tpr_at_fpr"].get("0.001")),
            _fmt(m["eps_lower_bound"], 2),
        ])
    return rows


def print_attack_table(attacks: Mapping[str, Mapping[str, Any]], target: Mapping[str, Any] | None = None,
                       title: str = "membership inference audit") -> None:
    from rich.console import Console
    from rich.table import Table

    caption = None
    if target:
        caption = f"target: train acc {target['train_acc']:.3f}, test acc {target['test_acc']:.3f}"
        dp = target.get("dp")
        caption += f", accountant epsilon {dp['epsilon']:.2f} (delta {dp['delta']:g})" if dp else ", no DP"
    table = Table(title=title, caption=caption)
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "attack" else "right")
    for row in attack_rows(attacks):
        table.add_row(*row)
    Console(width=120).print(table)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str = "ROC") -> Path:
    """Log-log axes: what matters for privacy is the low-FPR corner, which linear axes hide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    floor = 1.0
    for name, (scores, labels) in curves.items():
        fpr, tpr, _ = roc_curve(scores, labels)
        n_non = int((np.asarray(labels) == 0).sum())
        floor = min(floor, 1.0 / max(n_non, 1))
        ax.plot(np.maximum(fpr, 0.5 / max(n_non, 1)), np.maximum(tpr, 1e-5), label=name, linewidth=1.2)
    ax.plot([1e-5, 1], [1e-5, 1], "k--", linewidth=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor / 2, 1)
    ax.set_ylim(floor / 2, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_series(series: Mapping[str, tuple[list[float], list[float]]], path: Path, xlabel: str, ylabel: str,
                title: str, xlog: bool = False, chance: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name, linewidth=1.2)
    if chance is not None:
        ax.axhline(chance, color="k", linestyle="--", linewidth=0.8, label="chance")
    if xlog:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(path: Path, run_name: str, metrics: Mapping[str, Any], split_sizes: Mapping[str, int],
                 leakage_by_epoch: Mapping[str, Any] | None = None) -> Path:
    target = metrics["target"]
    dp = target.get("dp")
    lines = [
        f"# Membership inference audit: {run_name}",
        "",
        f"Target: train accuracy {target['train_acc']:.4f} on {split_sizes['members']} members, "
        f"test accuracy {target['test_acc']:.4f} on {split_sizes['nonmembers']} non-members, "
        f"{target['epochs']} epochs.",
        f"Training: DP-SGD, accountant epsilon {dp['epsilon']:.3f} at delta {dp['delta']:g} "
        f"(noise multiplier {dp['noise_multiplier']:.3f}, max grad norm {dp['max_grad_norm']:g}, "
        f"{dp['accountant']} accountant)." if dp else "Training: no differential privacy.",
        "",
        f"Attacks are trained on the attacker's known sets ({split_sizes['attack_train_members']} members / "
        f"{split_sizes['attack_train_nonmembers']} non-members) and evaluated on disjoint sets "
        f"({split_sizes['attack_test_members']} / {split_sizes['attack_test_nonmembers']}). AUC 0.5 and "
        "accuracy 0.5 are chance. TPR at an FPR below 1/(number of non-members) cannot be measured and shows n/a.",
        "The empirical epsilon is a statistical lower bound (Clopper-Pearson, 95%) on the epsilon of any DP "
        "guarantee the training could have; for DP runs it should not exceed the accountant's epsilon.",
        "",
        markdown_table(list(COLUMNS), attack_rows(metrics.get("attacks", {}))),
        "",
        "![ROC](plots/roc.png)",
    ]
    if leakage_by_epoch:
        lines += ["", "Leakage of single-snapshot attacks at each saved epoch (AUC):", ""]
        epochs = leakage_by_epoch["epochs"]
        rows = [[name, *[f"{a:.3f}" for a in aucs]] for name, aucs in leakage_by_epoch["auc"].items()]
        lines += [markdown_table(["attack", *[f"epoch {e}" for e in epochs]], rows), "",
                  "![leakage vs epoch](plots/leakage_vs_epoch.png)"]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
