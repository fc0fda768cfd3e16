"""``python -m mia_lightning attack --run runs/<name>``: re-run or add attacks on a finished run, no retraining."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser

from datamodules.base import MembershipSplit
from mia_lightning.audit import check_attack_names, load_snapshot_models, record_audit, run_audit
from mia_lightning.config_loading import instantiate_datamodule
from mia_lightning.run import RunFolder


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m mia_lightning attack", description=__doc__)
    parser.add_argument("--run", type=str, required=True, help="a finished run folder, e.g. runs/digits")
    parser.add_argument("--attacks", type=list[str] | None, default=None,
                        help="attacks to run (default: the run's configured audit.attacks)")
    parser.add_argument("--per_epoch_attacks", type=list[str] | None, default=None,
                        help="attacks also scored at every snapshot (default: the run's configuration)")
    parser.add_argument("--attack_kwargs", type=dict[str, dict] | None, default=None)
    parser.add_argument("--progress", type=bool, default=True)
    return parser


def check_run(run: RunFolder) -> dict[str, Any]:
    """Refuse a missing or incomplete run folder, saying what is missing, before any work."""
    if not run.path.is_dir():
        raise FileNotFoundError(f"run folder {run.path} does not exist")
    missing = [p.name for p in (run.config, run.split, run.metrics) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"run folder {run.path} is incomplete: no {', '.join(missing)} (was its fit interrupted?)"
        )
    metrics = run.read_metrics()
    if "target" not in metrics:
        raise ValueError(f"run folder {run.path} has no finished target in metrics.json (was its fit interrupted?)")
    return metrics


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    run = RunFolder(Path(args.run))
    metrics = check_run(run)
    config = yaml.safe_load(run.config.read_text())
    audit_cfg = config.get("audit") or {}
    attacks = args.attacks if args.attacks is not None else audit_cfg.get("attacks") or []
    per_epoch = args.per_epoch_attacks if args.per_epoch_attacks is not None else audit_cfg.get("per_epoch_attacks")
    if args.attack_kwargs is not None:
        attack_kwargs = args.attack_kwargs
    else:  # the run's settings for the attacks that run now
        attack_kwargs = {k: v for k, v in (audit_cfg.get("attack_kwargs") or {}).items()
                         if k in attacks or k in (per_epoch or [])}
    check_attack_names(attacks)
    check_attack_names(per_epoch or [])
    if not attacks:
        raise ValueError("no attacks to run: pass --attacks, e.g. --attacks '[loss, whitebox]'")
    snapshots = load_snapshot_models(run)
    epochs = metrics["target"]["epochs"]
    final = [m for e, m in snapshots if e == epochs]
    if not final:
        raise FileNotFoundError(
            f"run folder {run.path} has no parameter snapshot of its final epoch {epochs} "
            f"(snapshots: {[e for e, _ in snapshots]}); refit with snapshots.last: true"
        )
    dm = instantiate_datamodule(config["data"], str(run.split))
    dm.stratify = MembershipSplit.load(run.split).stratified  # however it was drawn: the target trained on it
    dm.prepare_split()
    target = metrics["target"]
    result = run_audit(
        final[0], dm, attacks=attacks, snapshot_models=snapshots, attack_kwargs=attack_kwargs,
        per_epoch_attacks=per_epoch or [], delta=(target.get("dp") or {}).get("delta"), seed=dm.seed,
        progress=args.progress,
    )
    metrics = record_audit(run, result, dm.split.sizes(), target)
    log_to_wandb(run, config, metrics, result.scores)


def log_to_wandb(run: RunFolder, config: dict[str, Any], metrics: dict[str, Any], scores) -> None:
    """A new W&B run in the same group, ``job_type="attack"``, beside the target's run."""
    if config.get("trainer", {}).get("logger") is False:
        return
    from mia_lightning.wandb_audit import log_audit
    from mia_lightning.wandb_setup import WandbOptions, finish_wandb, start_wandb_run

    wandb_run = start_wandb_run(
        WandbOptions(**(config.get("wandb") or {})), run.path, name=f"{run.name}-attack",
        group=config.get("experiment"), job_type="attack",
        config={"run": run.name, "attacks": list(metrics.get("attacks", {}))},
    )
    try:
        log_audit(wandb_run, metrics, scores, run.plots)
    finally:
        finish_wandb()
