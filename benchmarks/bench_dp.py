"""How much slower is a DP-SGD epoch than a non-DP one, through the toolkit's own path (TargetModule + Trainer)?

The paper's Purchase FC model (600-1024-512-256-128-100) on SYNTHETIC Purchase100-like records
(``datamodules.synthetic``), one epoch over the members at batch size 256 (the expected size under Poisson sampling),
Adam, both arms on the same DataModule in one process. Ghost clipping should keep the DP epoch within 2.5x of the
non-DP one (hook-based per-example gradients were about 90x on a 2-core CPU). The machine is shared, so the arms
alternate, a warm-up pair is dropped, and the median ratio over the pairs is kept. Timed: from the epoch's start to
the end of its last optimizer step (not the epoch-end epsilon computation).
Last line: {"dp_over_nodp": r, "grad_sample_mode": mode}.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from typing import Any

import lightning as L
import torch

from datamodules.synthetic import SyntheticPurchaseDataModule
from mia_lightning.dp import GRAD_SAMPLE_MODES
from mia_lightning.target import TargetModule

BATCH = 256


class EpochTimer(L.Callback):
    """Seconds from the epoch's start to the end of its last step (callbacks run before the module's batch hook)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.seconds = time.perf_counter() - self.start


def epoch_seconds(datamodule: SyntheticPurchaseDataModule, dp: dict[str, Any] | None) -> tuple[float, str | None]:
    torch.manual_seed(0)
    model = TargetModule(arch="purchase_fc", num_classes=100, input_shape=(600,), optimizer="adam", lr=1e-3, dp=dp)
    timer = EpochTimer()
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=datamodule)
    summary = model.dp_summary()
    return timer.seconds, summary["grad_sample_mode"] if summary else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=10_000, help="records in the training set (one epoch)")
    parser.add_argument("--repeats", type=int, default=5, help="timed DP / non-DP pairs after the warm-up pair")
    parser.add_argument("--grad_sample_mode", choices=GRAD_SAMPLE_MODES, default="auto")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.members < BATCH or args.repeats < 1 or args.threads < 1:
        raise ValueError(f"need members >= {BATCH}, repeats >= 1 and threads >= 1, got {vars(args)}")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    datamodule = SyntheticPurchaseDataModule(
        num_records=args.members + 100, num_members=args.members, num_nonmembers=100, batch_size=BATCH, seed=0
    )
    dp = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "accountant": "rdp", "grad_sample_mode": args.grad_sample_mode}
    ratios, mode = [], None
    for repeat in range(args.repeats + 1):
        nodp, _ = epoch_seconds(datamodule, None)
        private, mode = epoch_seconds(datamodule, dp)
        if repeat == 0:
            continue  # warm-up
        ratios.append(private / nodp)
        print(f"pair {repeat}: non-DP {nodp:.2f} s, DP ({mode}) {private:.2f} s, ratio {ratios[-1]:.2f}", flush=True)
    ratio = statistics.median(ratios)
    print(f"DP-SGD epoch / non-DP epoch (median of {len(ratios)}, {args.members} members, batch {BATCH}): {ratio:.2f}")
    print(json.dumps({"dp_over_nodp": round(ratio, 3), "grad_sample_mode": mode}))


if __name__ == "__main__":
    main()
