"""The target model: the LightningModule whose leakage the toolkit measures."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from mia_lightning.models import build_model

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
SCHEDULERS = ("multistep", "cosine")


class TargetModule(L.LightningModule):
    """A classifier built by architecture name, trained with cross-entropy.

    Args:
        arch: a registered architecture (``mia_lightning.models.available_models()``).
        arch_kwargs: its arguments, e.g. ``{"widths": [256, 128], "activation": "tanh"}``.
        num_classes, input_shape: linked from the DataModule by the CLI.
        optimizer: ``adam`` | ``adamw`` | ``sgd``; ``momentum`` applies to sgd.
        scheduler: ``None`` | ``multistep`` (``milestones``, ``gamma``: the paper's CIFAR schedule) | ``cosine``.
        label_smoothing: a defense that can sit in a comparison beside DP.
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
        self.save_hyperparameters()
        self.model = build_model(arch, num_classes, tuple(input_shape), **(arch_kwargs or {}))
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        self.train_acc(logits, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

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
        scheduler = self.build_scheduler(optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def current_epsilon(self) -> float | None:
        """The privacy spent so far; None when not training with DP."""
        return None

    def dp_summary(self) -> dict[str, Any] | None:
        """The ``target.dp`` section of metrics.json; None when not training with DP."""
        return None


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
