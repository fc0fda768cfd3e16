"""The end-of-fit audit: evaluates the target and writes the run's metrics.json."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from mia_lightning.run import RunFolder
from mia_lightning.target import evaluate_accuracy


class MembershipAudit(L.Callback):
    """At the end of ``fit``: target train/test accuracy (members / non-members, eval mode) into metrics.json.

    Args:
        run_dir: the run folder; ``None`` means the trainer's ``default_root_dir``.
    """

    def __init__(self, run_dir: str | None = None) -> None:
        self.run_dir = run_dir

    def run_folder(self, trainer: L.Trainer) -> RunFolder:
        return RunFolder(Path(self.run_dir or trainer.default_root_dir))

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.interrupted:
            return
        dm = trainer.datamodule
        target = {
            "train_acc": evaluate_accuracy(pl_module.model, dm.part_dataloader("members")),
            "test_acc": evaluate_accuracy(pl_module.model, dm.part_dataloader("nonmembers")),
            "epochs": int(trainer.current_epoch),
            "dp": pl_module.dp_summary() if hasattr(pl_module, "dp_summary") else None,
        }
        self.run_folder(trainer).update_metrics(target=target)
        for logger in trainer.loggers:
            logger.log_metrics({f"target/{k}": v for k, v in target.items() if isinstance(v, (int, float))})
