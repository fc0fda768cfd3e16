"""Compare arms that differ in their privacy setting (or another defense) only: same split, seed, architecture.

Each arm is a full ``fit`` + audit in ``<runs_dir>/<experiment>/<arm>/``; all arms read one ``split.npz`` in the
experiment folder. Results: ``compare.csv``, ``compare.md``, plots, and a printed table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mia_lightning.config_loading import instantiate_datamodule, set_dotted
from mia_lightning.executors import Job, run_jobs
from mia_lightning.run import RunFolder, atomic_write_text

FORBIDDEN_ARM_KEYS = ("data", "seed_everything", "trainer.max_epochs", "model.arch", "model.arch_kwargs")


@dataclass
class Arm:
    """A named set of config overrides, e.g. ``{"model.dp": {"target_epsilon": 1.0}}``."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class ComparePlan:
    experiment: str
    base_config: str
    arms: list[Arm]
    common: dict[str, Any] = field(default_factory=dict)
    runs_dir: str = "runs"
    executor: str = "sequential"
    address: str | None = None
    num_cpus_per_arm: float = 1
    num_gpus_per_arm: float = 0
    threads_per_arm: int | None = None
    roc_attack: str | None = None

    def __post_init__(self) -> None:
        if not self.arms:
            raise ValueError("a comparison needs at least one arm")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be unique, got {names}")
        for arm in self.arms:
            if not arm.name or "/" in arm.name or arm.name.startswith("."):
                raise ValueError(f"arm name {arm.name!r} must be a plain folder name")
            for key in arm.overrides:
                if any(key == k or key.startswith(k + ".") for k in FORBIDDEN_ARM_KEYS):
                    raise ValueError(
                        f"arm {arm.name!r} overrides {key!r}: arms must share the split, seed, architecture and "
                        "epochs; put such settings in `common` (applied to every arm)"
                    )
        if not Path(self.base_config).is_file():
            raise FileNotFoundError(f"base_config {self.base_config} does not exist (paths are relative to cwd)")
        if self.executor not in ("sequential", "ray"):
            raise ValueError(f"unknown executor {self.executor!r}; use 'sequential' or 'ray'")
        if self.num_cpus_per_arm <= 0 or self.num_gpus_per_arm < 0:
            raise ValueError("num_cpus_per_arm must be > 0 and num_gpus_per_arm >= 0")

    @property
    def folder(self) -> Path:
        return Path(self.runs_dir) / self.experiment

    @property
    def split_file(self) -> Path:
        return self.folder / "split.npz"


def _cli_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def arm_arguments(plan: ComparePlan, arm: Arm) -> list[str]:
    """The ``fit`` command line of one arm: the base config, the shared split, then common and arm overrides."""
    args = [
        "--config", str(plan.base_config),
        "--runs_dir", str(plan.folder),
        "--run_name", arm.name,
        "--experiment", plan.experiment,
        "--data.init_args.split_file", str(plan.split_file),
    ]
    for key, value in {**plan.common, **arm.overrides}.items():
        args += [f"--{key}", _cli_value(value)]
    return args


def run_arm(args: list[str], threads: int | None) -> dict[str, Any]:
    """One arm in this process (or a Ray worker): ``fit`` + audit; returns its metrics.json."""
    import os

    os.environ.setdefault("WANDB_MODE", "offline")
    import torch

    from mia_lightning.cli import main

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        main(["fit", *args])
    finally:
        torch.set_num_threads(previous)
    folder = Path(args[args.index("--runs_dir") + 1]) / args[args.index("--run_name") + 1]
    return RunFolder(folder).read_metrics()


def arm_is_complete(run: RunFolder) -> bool:
    """Fit and audit both finished: the report is the audit's last artefact."""
    return run.report.is_file() and run.is_finished()


def prepare_split(plan: ComparePlan) -> None:
    """Draw (or check) the shared split once, before any arm starts, so parallel arms cannot race for it."""
    base = yaml.safe_load(Path(plan.base_config).read_text()) or {}
    for key, value in plan.common.items():
        if key.startswith("data."):
            set_dotted(base, key, value)
    instantiate_datamodule(base["data"], str(plan.split_file)).prepare_split()


def run_compare(plan: ComparePlan, force: bool = False) -> list[dict[str, Any]]:
    """Run every arm not yet complete (all with ``force``), then tabulate. Returns one row per arm."""
    plan.folder.mkdir(parents=True, exist_ok=True)
    prepare_split(plan)
    jobs = []
    for arm in plan.arms:
        run = RunFolder(plan.folder / arm.name)
        if arm_is_complete(run) and not force:
            print(f"arm {arm.name}: complete, skipped (use --force to rerun)")
            continue
        if run.path.exists():  # half-finished (or forced): restart cleanly
            shutil.rmtree(run.path)
        jobs.append(Job(arm.name, run_arm, (arm_arguments(plan, arm), plan.threads_per_arm)))
    options = {}
    if plan.executor == "ray":
        options = dict(address=plan.address, num_cpus=plan.num_cpus_per_arm, num_gpus=plan.num_gpus_per_arm)
    run_jobs(jobs, plan.executor, **options)
    rows = collect_rows(plan)
    write_results(plan, rows)
    return rows


def arm_epsilon(metrics: Mapping[str, Any]) -> float:
    dp = metrics["target"].get("dp")
    return float(dp["epsilon"]) if dp else math.inf


def collect_rows(plan: ComparePlan) -> list[dict[str, Any]]:
    rows = []
    for arm in plan.arms:
        run = RunFolder(plan.folder / arm.name)
        if not arm_is_complete(run):
            raise RuntimeError(f"arm {arm.name} did not complete; see {run.path}")
        metrics = run.read_metrics()
        rows.append({"arm": arm.name, "epsilon": arm_epsilon(metrics), "metrics": metrics})
    return rows


def strongest_attack(attacks: Mapping[str, Mapping[str, Any]]) -> str:
    return max(attacks, key=lambda a: attacks[a]["auc"])


def attack_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for row in rows:
        names += [a for a in row["metrics"].get("attacks", {}) if a not in names]
    return names


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    names = attack_names(rows)
    header = ["arm", "epsilon", "delta", "train_acc", "test_acc", "max_eps_lower_bound"]
    for a in names:
        header += [f"{a}_auc", f"{a}_auc_lo", f"{a}_auc_hi", f"{a}_tpr@1%fpr", f"{a}_tpr@0.1%fpr", f"{a}_eps_lb"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for row in rows:
        target, attacks = row["metrics"]["target"], row["metrics"].get("attacks", {})
        dp = target.get("dp") or {}
        eps_lbs = [m["eps_lower_bound"] for m in attacks.values()]
        line = [row["arm"], _num(row["epsilon"]), _num(dp.get("delta")), _num(target["train_acc"]),
                _num(target["test_acc"]), _num(max(eps_lbs) if eps_lbs else None)]
        for a in names:
            m = attacks.get(a)
            if m is None:
                line += [""] * 6
                continue
            ci = m.get("auc_ci") or [None, None]
            line += [_num(m["auc"]), _num(ci[0]), _num(ci[1]), _num(m["tpr_at_fpr"].get("0.01")),
                     _num(m["tpr_at_fpr"].get("0.001")), _num(m["eps_lower_bound"])]
        writer.writerow(line)
    return out.getvalue()


def summary_table(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One row per arm: privacy, utility, and the strongest attack's leakage."""
    header = ["arm", "epsilon", "train acc", "test acc", "strongest attack", "AUC [95% CI]", "TPR@1%FPR",
              "TPR@0.1%FPR", "emp. eps (max)"]
    body = []
    for row in rows:
        target, attacks = row["metrics"]["target"], row["metrics"].get("attacks", {})
        eps = "inf" if math.isinf(row["epsilon"]) else f"{row['epsilon']:.2f}"
        if not attacks:
            body.append([row["arm"], eps, f"{target['train_acc']:.3f}", f"{target['test_acc']:.3f}"] + ["n/a"] * 5)
            continue
        best = strongest_attack(attacks)
        m = attacks[best]
        ci = m.get("auc_ci")
        tpr1, tpr01 = m["tpr_at_fpr"].get("0.01"), m["tpr_at_fpr"].get("0.001")
        body.append([
            row["arm"], eps, f"{target['train_acc']:.3f}", f"{target['test_acc']:.3f}", best,
            f"{m['auc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{m['auc']:.3f}",
            "n/a" if tpr1 is None else f"{tpr1:.3f}",
            "n/a" if tpr01 is None else f"{tpr01:.3f}",
            f"{max(a['eps_lower_bound'] for a in attacks.values()):.2f}",
        ])
    return header, body


def auc_table(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    names = attack_names(rows)
    body = [[row["arm"], *[_num(row["metrics"].get("attacks", {}).get(a, {}).get("auc"), 3) for a in names]]
            for row in rows]
    return ["arm", *names], body


def write_results(plan: ComparePlan, rows: Sequence[Mapping[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    from mia_lightning.report import markdown_table

    atomic_write_text(plan.folder / "compare.csv", csv_text(rows))
    header, body = summary_table(rows)
    auc_header, auc_body = auc_table(rows)
    md = [
        f"# Comparison: {plan.experiment}",
        "",
        "Every arm trains the same architecture on the same members for the same epochs from the same seed, and is",
        "attacked on the same records; arms differ only in their overrides. `epsilon` is the accountant's",
        "(`inf` = no DP); `emp. eps` is the largest attack-derived lower bound, which must not exceed it.",
        "",
        markdown_table(header, body),
        "",
        "AUC of every attack:",
        "",
        markdown_table(auc_header, auc_body),
        "",
        "![accuracy vs epsilon](plots/accuracy_vs_epsilon.png) ![leakage vs epsilon](plots/leakage_vs_epsilon.png)",
        "![ROC of every arm](plots/roc_arms.png)",
    ]
    atomic_write_text(plan.folder / "compare.md", "\n".join(md) + "\n")
    write_plots(plan, rows)
    table = Table(title=f"comparison: {plan.experiment}")
    for col in header:
        table.add_column(col, justify="left" if col in ("arm", "strongest attack") else "right")
    for line in body:
        table.add_row(*line)
    Console(width=160).print(table)
    print(f"results: {plan.folder / 'compare.md'}, {plan.folder / 'compare.csv'}")


def write_plots(plan: ComparePlan, rows: Sequence[Mapping[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mia_lightning.audit import SCORES_FILE, load_scores
    from mia_lightning.report import plot_roc

    plots = plan.folder / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    dp_rows = sorted((r for r in rows if not math.isinf(r["epsilon"])), key=lambda r: r["epsilon"])
    nodp_rows = [r for r in rows if math.isinf(r["epsilon"])]
    names = attack_names(rows)

    def panel(ax, values, label, color=None):
        xs = [r["epsilon"] for r in dp_rows]
        line = ax.plot(xs, [values(r) for r in dp_rows], marker="o", label=label, color=color)[0] if dp_rows else None
        for r in nodp_rows:
            ax.axhline(values(r), linestyle="--", linewidth=0.9, color=line.get_color() if line else color,
                       label=f"{label} ({r['arm']}, no DP)")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    panel(ax, lambda r: r["metrics"]["target"]["test_acc"], "test accuracy")
    panel(ax, lambda r: r["metrics"]["target"]["train_acc"], "train accuracy")
    ax.set_xscale("log")
    ax.set_xlabel("accountant epsilon")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plots / "accuracy_vs_epsilon.png", dpi=120)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for a in names:
        panel(ax1, lambda r, a=a: r["metrics"]["attacks"].get(a, {}).get("auc", np.nan), a)
        panel(ax2, lambda r, a=a: r["metrics"]["attacks"].get(a, {}).get("tpr_at_fpr", {}).get("0.01") or np.nan, a)
    for ax, label in ((ax1, "attack AUC"), (ax2, "TPR at 1% FPR")):
        ax.set_xscale("log")
        ax.set_xlabel("accountant epsilon")
        ax.set_ylabel(label)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(plots / "leakage_vs_epsilon.png", dpi=120)
    plt.close(fig)

    curves = {}
    for row in rows:
        scores_path = plan.folder / row["arm"] / SCORES_FILE
        attacks = row["metrics"].get("attacks", {})
        if not attacks or not scores_path.exists():
            continue
        attack = plan.roc_attack or strongest_attack(rows[0]["metrics"].get("attacks", {}) or attacks)
        scores = load_scores(scores_path)
        if attack in scores:
            eps = "inf" if math.isinf(row["epsilon"]) else f"{row['epsilon']:.2g}"
            curves[f"{row['arm']} (eps {eps})"] = scores[attack]
    if curves:
        plot_roc(curves, plots / "roc_arms.png", title=f"ROC of every arm: {plan.roc_attack or 'strongest attack'}")
