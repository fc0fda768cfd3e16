"""Save the target model's parameters at chosen epochs, for the multi-epoch white-box attack."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import wandb
from lightning.pytorch.loggers import WandbLogger
from torch import nn

from mia_lightning.snapshots import SNAPSHOT_DIRNAME, save_snapshot, snapshot_filename

# Hyperparameters of TargetModule that let model_from_snapshot rebuild the network.
ARCHITECTURE_HPARAMS = ("arch", "arch_kwargs", "num_classes", "input_shape", "replace_batchnorm")


class ParameterSnapshot(pl.Callback):
    """Write ``<dirpath>/epoch_NNN.safetensors`` after the chosen epochs (epoch 1 = after the first epoch).

    Args:
        epochs: epochs to save, e.g. ``[40, 60, 80, 90, 100]`` as in the paper's multi-epoch attack.
        every_n_epochs: also save every n-th epoch.
        last: also save the final epoch, however training ends (max_epochs, max_steps, early stopping).
        dirpath: where to write; default ``<trainer.default_root_dir>/snapshots``.
        log_artifact: also log each file as a version of a W&B artifact (needs a WandbLogger).

    The epochs are checked against ``trainer.max_epochs`` in ``setup``, before any training, so a typo does
    not surface as a missing snapshot after hours of training.
    """

    def __init__(
        self,
        epochs: Sequence[int] | None = None,
        every_n_epochs: int | None = None,
        last: bool = False,
        dirpath: str | Path | None = None,
        log_artifact: bool = False,
    ) -> None:
        super().__init__()
        if not epochs and every_n_epochs is None and not last:
            raise ValueError("ParameterSnapshot needs epochs, every_n_epochs or last=True; none was given")
        epochs = list(epochs or [])
        bad = [e for e in epochs if isinstance(e, bool) or not isinstance(e, int) or e < 1]
        if bad:
            raise ValueError(
                f"snapshot epochs count from 1 (after the first epoch) and must be ints; got {bad}"
            )
        if every_n_epochs is not None and (isinstance(every_n_epochs, bool) or every_n_epochs < 1):
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        self.epochs = sorted(set(epochs))
        self.every_n_epochs = every_n_epochs
        self.last = last
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.log_artifact = log_artifact
        self.saved: dict[int, Path] = {}
        self._last_epoch = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            beyond = [e for e in self.epochs if e > max_epochs]
            if beyond:
                raise ValueError(
                    f"snapshot epochs {beyond} are beyond trainer.max_epochs={max_epochs}: they would never "
                    "be saved"
                )
            only_every_n = not self.epochs and not self.last
            if only_every_n and self.every_n_epochs > max_epochs:
                raise ValueError(
                    f"every_n_epochs={self.every_n_epochs} exceeds trainer.max_epochs={max_epochs}: "
                    "no snapshot would be saved"
                )
        if self.log_artifact and self._wandb_logger(trainer) is None:
            raise ValueError("log_artifact=True needs a WandbLogger among the trainer's loggers")
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / SNAPSHOT_DIRNAME

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        self._last_epoch = epoch
        if epoch in self.epochs or (self.every_n_epochs is not None and epoch % self.every_n_epochs == 0):
            self._save(trainer, pl_module, epoch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.last and self._last_epoch > 0 and self._last_epoch not in self.saved:
            self._save(trainer, pl_module, self._last_epoch)

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        if not trainer.is_global_zero:
            return
        metadata = self._metadata(trainer, pl_module, epoch)
        # TargetModule keeps the network at .model: its keys are the ones build_model's network expects.
        network = pl_module.model if isinstance(getattr(pl_module, "model", None), nn.Module) else pl_module
        path = save_snapshot(self.dirpath / snapshot_filename(epoch), network, metadata)
        self.saved[epoch] = path
        if self.log_artifact:
            run = self._wandb_logger(trainer).experiment
            artifact = wandb.Artifact(f"snapshots-{run.id}", type="model", metadata=metadata)
            artifact.add_file(str(path), name=path.name)
            run.log_artifact(artifact, aliases=[f"epoch_{epoch:03d}"])

    @staticmethod
    def _metadata(trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> dict[str, Any]:
        metadata: dict[str, Any] = {"epoch": epoch, "global_step": trainer.global_step}
        current_epsilon = getattr(pl_module, "current_epsilon", None)
        if callable(current_epsilon) and (epsilon := current_epsilon()) is not None:
            metadata["epsilon"] = float(epsilon)
        hparams = pl_module.hparams
        for key in ARCHITECTURE_HPARAMS:
            if key in hparams:
                value = hparams[key]
                metadata[key] = dict(value or {}) if key == "arch_kwargs" else value
        if "input_shape" in metadata:
            metadata["input_shape"] = list(metadata["input_shape"])
        return metadata

    @staticmethod
    def _wandb_logger(trainer: pl.Trainer) -> WandbLogger | None:
        return next((logger for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)
