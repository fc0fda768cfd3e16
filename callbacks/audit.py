"""The end-of-fit audit: evaluate the target, run the membership attacks, write metrics, plots and report."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from mia_lightning.audit import (
    DEFAULT_ATTACKS,
    check_attack_names,
    check_audit_settings,
    load_snapshot_models,
    record_audit,
    run_audit,
)
from mia_lightning.run import RunFolder
from mia_lightning.target import evaluate_accuracy


class MembershipAudit(L.Callback):
    """At the end of ``fit``: target train/test accuracy, then every configured attack, into the run folder.

    Args:
        attacks: attack names (``mia_lightning.attacks.ATTACKS``); ``[]`` records the target's accuracy only.
        attack_kwargs: per-attack settings, e.g. ``{"whitebox": {"gradients": ["fc3"], "max_epochs": 30}}``;
            settings of attacks not run this time are set aside (a config may narrow ``attacks`` on the command
            line), settings of unknown attacks refused.
        per_epoch_attacks: single-snapshot attacks also scored at every parameter snapshot (leakage vs epoch).
        run_dir: the run folder; ``None`` means the trainer's ``default_root_dir``.
        progress: progress bars for feature extraction and attack training.
    """

    def __init__(
        self,
        attacks: list[str] | None = None,
        attack_kwargs: dict[str, dict] | None = None,
        per_epoch_attacks: list[str] | None = None,
        run_dir: str | None = None,
        progress: bool = True,
    ) -> None:
        self.attacks = list(DEFAULT_ATTACKS if attacks is None else attacks)
        self.per_epoch_attacks = list(per_epoch_attacks or [])
        check_attack_names(self.attacks)
        check_attack_names(self.per_epoch_attacks)
        check_attack_names(list(attack_kwargs or {}))
        running = {*self.attacks, *self.per_epoch_attacks}
        self.attack_kwargs = {k: v for k, v in (attack_kwargs or {}).items() if k in running}
        self.run_dir = run_dir
        self.progress = progress

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Check every attack's settings against the target model now, before training, not after it."""
        if stage == "fit":
            check_audit_settings(pl_module.model, self.attacks, self.per_epoch_attacks, self.attack_kwargs)

    def run_folder(self, trainer: L.Trainer) -> RunFolder:
        return RunFolder(Path(self.run_dir or trainer.default_root_dir))

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        run, dm = self.run_folder(trainer), trainer.datamodule
        target = {
            "train_acc": evaluate_accuracy(pl_module.model, dm.part_dataloader("members")),
            "test_acc": evaluate_accuracy(pl_module.model, dm.part_dataloader("nonmembers")),
            "epochs": int(trainer.current_epoch),
            "dp": pl_module.dp_summary() if hasattr(pl_module, "dp_summary") else None,
        }
        run.update_metrics(target=target)
        wandb_run = next((lg.experiment for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        for logger in trainer.loggers:
            logger.log_metrics({f"target/{k}": v for k, v in target.items() if isinstance(v, (int, float))})
        if not self.attacks:
            return
        result = run_audit(
            pl_module.model,
            dm,
            attacks=self.attacks,
            snapshot_models=load_snapshot_models(run),
            attack_kwargs=self.attack_kwargs,
            per_epoch_attacks=self.per_epoch_attacks,
            delta=(target["dp"] or {}).get("delta"),
            seed=dm.seed,
            progress=self.progress,
        )
        metrics = record_audit(run, result, dm.split.sizes(), target)
        if wandb_run is not None:
            from mia_lightning.wandb_audit import log_audit

            log_audit(wandb_run, metrics, result.scores, run.plots)
