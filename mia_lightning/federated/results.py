"""What a federated run leaves behind: metrics.json, attack scores, ROC and accuracy plots, report.md, W&B."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mia_lightning.audit import SCORES_FILE, save_scores
from mia_lightning.report import COLUMNS, attack_rows, markdown_table, plot_roc, plot_series
from mia_lightning.run import RunFolder, atomic_write_text
from mia_lightning.wandb_setup import WandbOptions

Scores = Mapping[str, tuple[np.ndarray, np.ndarray]]
ACCURACY_PLOT = "global_accuracy.png"


def write_results(run: RunFolder, metrics: Mapping[str, Any], scores: Scores) -> None:
    """Scores, plots and report first, metrics.json last: a run counts as finished only once it is complete."""
    save_scores(run.path / SCORES_FILE, scores)
    plot_roc(scores, run.plots / "roc.png", title=f"ROC: {run.name}")
    trainings = metrics["federation"]["trainings"]
    plot_series(
        {name: (list(range(1, len(t["test_acc_by_round"]) + 1)), t["test_acc_by_round"])
         for name, t in trainings.items()},
        run.plots / ACCURACY_PLOT, xlabel="round", ylabel="test accuracy of the aggregate",
        title="each federation's aggregate",
    )
    atomic_write_text(run.report, report_text(run.name, metrics))
    run.update_metrics(**metrics)


def report_text(run_name: str, metrics: Mapping[str, Any]) -> str:
    target, federation, attacks = metrics["target"], metrics["federation"], metrics["attacks"]
    dp = target.get("dp")
    some = next(iter(attacks.values()))
    rounds = federation["observed_rounds"]
    lines = [
        f"# Federated membership inference: {run_name}",
        "",
        f"FedAvg with {target['participants']} participants holding {target['share_size']} records each, "
        f"{target['rounds']} rounds of {target['local_epochs']} local epoch(s). The honest federation's final "
        f"aggregate: train accuracy {target['train_acc']:.4f} (all members), test accuracy {target['test_acc']:.4f} "
        "(non-members).",
        f"Every participant trains with DP-SGD: epsilon {dp['epsilon']:.3f} at delta {dp['delta']:g} over the whole "
        f"federation (noise multiplier {dp['noise_multiplier']:.3f}, max grad norm {dp['max_grad_norm']:g})."
        if dp else "No differential privacy.",
        "",
        f"The global attacker (the server) targets participant {federation['target_participant']}'s data and sees "
        f"its uploads; the local attacker (participant {federation['local_attacker']}) targets the other "
        "participants' data and sees only the aggregates it receives. Both observe rounds "
        f"{', '.join(map(str, rounds))}. Active attackers raise the loss of the records they attack by gradient "
        f"ascent every round ({federation.get('ascent', 'mean')} step, gamma {federation['gamma']:g}); the "
        "isolating server trains the target alone. Passive "
        "settings observe the honest federation; each active setting trains its own. Each attack model learns from "
        "known members and non-members and is evaluated on disjoint target records "
        f"({some['n_members']} members / {some['n_nonmembers']} non-members). AUC and accuracy 0.5 are chance.",
        "",
        markdown_table(list(COLUMNS), attack_rows(attacks)),
        "",
        "Test accuracy of each federation's aggregate at the observed rounds (an isolating server's aggregate "
        "averages the other participants only, which the server's ascent on the target's model does not touch):",
        "",
        markdown_table(
            ["federation", *[f"round {r}" for r in rounds]],
            [[name, *[f"{t['test_acc_by_round'][r - 1]:.3f}" for r in rounds]]
             for name, t in federation["trainings"].items()],
        ),
        "",
        f"![ROC](plots/roc.png) ![test accuracy by round](plots/{ACCURACY_PLOT})",
    ]
    return "\n".join(lines) + "\n"


def log_to_wandb(run: RunFolder, options: WandbOptions, group: str, config: Mapping[str, Any],
                 metrics: Mapping[str, Any], scores: Scores) -> None:
    """One W&B run (``job_type="federated"``): the audit's summary, tables and ROC, and accuracy by round."""
    import wandb

    from mia_lightning.wandb_audit import log_audit
    from mia_lightning.wandb_setup import finish_wandb, start_wandb_run

    wandb_run = start_wandb_run(options, run.path, name=run.name, group=group, job_type="federated",
                                config=dict(config))
    try:
        log_audit(wandb_run, metrics, scores, run.plots)
        trainings = metrics["federation"]["trainings"]
        curves = [t["test_acc_by_round"] for t in trainings.values()]
        wandb_run.log({
            "federation/test_acc_by_round": wandb.plot.line_series(
                xs=list(range(1, len(curves[0]) + 1)), ys=curves, keys=list(trainings),
                title="test accuracy of each federation's aggregate", xname="round",
            ),
            f"plots/{ACCURACY_PLOT.removesuffix('.png')}": wandb.Image(str(run.plots / ACCURACY_PLOT)),
        })
    finally:
        finish_wandb()
