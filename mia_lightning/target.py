"""The target model: the LightningModule whose leakage the toolkit measures."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from mia_lightning.dp import (
    DPSGD,
    DPConfig,
    as_dp_config,
    check_dp_compatible,
    check_trainer_for_dp,
    choose_grad_sample_mode,
    dp_config_as_dict,
    fix_for_dp,
)
from mia_lightning.models import build_model

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
SCHEDULERS = ("multistep", "cosine")
DP_CHECKPOINT_KEY = "dp_accountant"


class TargetModule(L.LightningModule):
    """A classifier built by architecture name, trained with cross-entropy.

    Args:
        arch: a registered architecture (``mia_lightning.models.available_models()``).
        arch_kwargs: its arguments, e.g. ``{"widths": [256, 128], "activation": "tanh"}``.
        num_classes, input_shape: linked from the DataModule by the CLI.
        optimizer: ``adam`` | ``adamw`` | ``sgd``; ``momentum`` applies to sgd.
        scheduler: ``None`` | ``multistep`` (``milestones``, ``gamma``: the paper's CIFAR schedule) | ``cosine``.
        label_smoothing: a defense that can sit in a comparison beside DP.
        replace_batchnorm: apply Opacus' ``ModuleValidator.fix`` (BatchNorm -> GroupNorm). DP arms always get it;
            set it on the non-DP arm of a comparison so both arms train the same architecture.
        dp: train with DP-SGD (``mia_lightning.dp.DPConfig``); ``None`` trains with the plain optimizer.

    Under DP the module optimises manually (Opacus' ghost clipping needs its own two-pass backward), takes every
    Poisson batch as one noisy step, logs ``epsilon`` each epoch and keeps the accountant in its checkpoints.
    """

    def __init__(
        self,
        arch: str = "fc",
        arch_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (64,),
        optimizer: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        scheduler: str | None = None,
        milestones: list[int] | None = None,
        gamma: float = 0.1,
        label_smoothing: float = 0.0,
        replace_batchnorm: bool = False,
        dp: DPConfig | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; available: {', '.join(OPTIMIZERS)}")
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; available: None, {', '.join(SCHEDULERS)}")
        if scheduler == "multistep" and not milestones:
            raise ValueError("scheduler 'multistep' needs milestones, e.g. [50, 100]")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        dp_config = as_dp_config(dp)
        # save_hyperparameters reads these locals: record the effective architecture, and dp as plain data.
        replace_batchnorm = replace_batchnorm or dp_config is not None
        dp = dp_config_as_dict(dp_config)
        self.save_hyperparameters()
        model = build_model(arch, num_classes, tuple(input_shape), **(arch_kwargs or {}))
        if replace_batchnorm:
            model, replaced = fix_for_dp(model)
            if replaced:
                rank_zero_info(f"replaced modules {replaced} by their DP-compatible equivalents (GroupNorm, ...)")
        if dp_config is not None:
            check_dp_compatible(model)
        self.model = model
        self.dp_config = dp_config
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.dpsgd: DPSGD | None = None
        self._resumed_dp_state: dict[str, Any] | None = None
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def is_private(self) -> bool:
        return self.dp_config is not None

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "poisson_sampling"):
            # before the loaders are built; also resets a DataModule reused from a DP arm
            datamodule.poisson_sampling = self.dp_config is not None and self.dp_config.poisson_sampling
        if self.dp_config is not None:
            mode = choose_grad_sample_mode(self.model, self.dp_config.grad_sample_mode)
            check_trainer_for_dp(self.trainer, self.dp_config, mode)
            # switched here, after the DP checks, so a bad trainer setting gets the DP-specific error above
            self.automatic_optimization = False

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.automatic_optimization:
            logits = self.model(x)
            loss = self.criterion(logits, y)
            self._log_train(logits, y, loss)
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        logits = self.model(x)
        loss = self.dpsgd.criterion(logits, y)
        # An empty Poisson batch still takes its noise-only step: skipping it would reveal that it was empty.
        self.manual_backward(loss)
        optimizer.step()
        loss = loss.detach()
        if len(y):
            self._log_train(logits.detach(), y, loss)
        return loss

    def _log_train(self, logits: Tensor, y: Tensor, loss: Tensor) -> None:
        self.train_acc(logits, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # At the epoch's last batch rather than in on_train_epoch_end, which runs after the progress bar's refresh.
        if self.dpsgd is not None and self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self.log("epsilon", self.dpsgd.epsilon(), on_step=False, on_epoch=True, prog_bar=True)

    def on_train_epoch_end(self) -> None:
        if self.dpsgd is None:
            return
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()  # manual optimisation steps its own schedulers, once per epoch as the non-DP arm

    def on_train_end(self) -> None:
        if self.dpsgd is not None:
            self.dpsgd.detach()
            rank_zero_info(
                f"DP-SGD: epsilon={self.dpsgd.epsilon():.4f} at delta={self.dpsgd.delta:g} after "
                f"{self.dpsgd.steps} steps (noise_multiplier={self.dpsgd.noise_multiplier:.4f}, "
                f"sample_rate={self.dpsgd.sample_rate:.5f}, accountant={self.dp_config.accountant})"
            )

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.model(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True, batch_size=len(y))
        self.log("val_acc", self.val_acc, on_epoch=True, prog_bar=True, batch_size=len(y))

    def build_optimizer(self) -> torch.optim.Optimizer:
        hp = self.hparams
        kwargs: dict[str, Any] = {"lr": hp.lr, "weight_decay": hp.weight_decay}
        if hp.optimizer == "sgd":
            kwargs["momentum"] = hp.momentum
        return OPTIMIZERS[hp.optimizer](self.model.parameters(), **kwargs)

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
        hp = self.hparams
        if hp.scheduler == "multistep":
            return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(hp.milestones), gamma=hp.gamma)
        if hp.scheduler == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs))
        return None

    def configure_optimizers(self):
        optimizer = self.build_optimizer()
        if self.dp_config is not None:
            optimizer = self._make_private(optimizer)
        scheduler = self.build_scheduler(optimizer)
        if scheduler is None:
            return optimizer
        if self.dp_config is not None:  # manual optimisation: on_train_epoch_end steps it
            return {"optimizer": optimizer, "lr_scheduler": scheduler}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def _make_private(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Attach Opacus to the network and the optimizer; the accounting continues from a resumed checkpoint, or
        from an earlier fit of this module."""
        state = self._resumed_dp_state
        if state is None and self.dpsgd is not None:
            if self.dp_config.target_epsilon is not None:
                raise ValueError(
                    "this module already trained under DP-SGD in an earlier fit, so a new fit cannot spend exactly "
                    "dp.target_epsilon: resume from the run's checkpoint (ckpt_path) or give dp.noise_multiplier"
                )
            state = self.dpsgd.state_dict()
        # Opacus needs the loader Lightning will iterate (its dataset and sampling rate): build it now.
        self.trainer.fit_loop.setup_data()
        self.dpsgd = DPSGD.attach(
            self.model,
            optimizer,
            self.criterion,
            self.trainer.train_dataloader,
            self.dp_config,
            planned_steps=self.trainer.estimated_stepping_batches,
            state=state,
        )
        self._resumed_dp_state = None
        settings = {k: v for k, v in self.dpsgd.summary().items() if k not in ("epsilon", "steps")}
        rank_zero_info("DP-SGD: " + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in settings.items()))
        for logger in self.trainer.loggers:
            logger.log_hyperparams({f"dp/{k}": v for k, v in settings.items()})
        return self.dpsgd.optimizer

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.dpsgd is not None:
            checkpoint[DP_CHECKPOINT_KEY] = self.dpsgd.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(DP_CHECKPOINT_KEY)
        if self.dp_config is not None and state is None:
            raise ValueError(
                "the checkpoint was trained without DP-SGD: its steps cannot be accounted for, so a DP run cannot "
                "resume from it; start the DP arm from scratch"
            )
        if self.dp_config is None and state is not None:
            raise ValueError(
                "the checkpoint holds a DP-SGD run (it carries the accountant's state): resume it with its dp: "
                "section, or training would continue without clipping and noise"
            )
        self._resumed_dp_state = state

    def current_epsilon(self) -> float | None:
        """The privacy spent so far; None when not training with DP (or before DP-SGD is attached)."""
        return self.dpsgd.epsilon() if self.dpsgd is not None else None

    def dp_summary(self) -> dict[str, Any] | None:
        """The ``target.dp`` section of metrics.json; None when not training with DP."""
        return self.dpsgd.summary() if self.dpsgd is not None else None


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, loader) -> float:
    """Top-1 accuracy in eval mode over a whole loader (restores the model's mode afterwards)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        device = next(model.parameters()).device
        for x, y in loader:
            pred = model(x.to(device)).argmax(dim=1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("cannot evaluate accuracy on an empty loader")
    return correct / total
