"""Weights & Biases for a run: offline unless the user opts in, never an interactive prompt."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class WandbOptions:
    """``online: false`` writes ``<run>/wandb/offline-run-*`` (``wandb sync`` uploads it later)."""

    project: str = "mia-lightning"
    entity: str | None = None
    online: bool = False
    tags: list[str] = field(default_factory=list)


def check_online_possible(options: WandbOptions) -> None:
    """Online mode without credentials would prompt for a key: refuse before any work instead."""
    if not options.online:
        return
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.exists() and "api.wandb.ai" in netrc.read_text())
    if not has_key:
        raise ValueError(
            "wandb.online is true but no W&B credentials were found (set WANDB_API_KEY or run `wandb login`); "
            "or leave wandb.online false and `wandb sync` the offline run later"
        )


def quiet_settings():
    """No console capture, system stats or git probing: a run records what the toolkit logs, nothing else."""
    import wandb

    return wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True)


def start_wandb_run(options: WandbOptions, run_dir: Path, name: str, group: str | None, job_type: str,
                    config: dict[str, Any]):
    """A plain W&B run beside a run folder's own (the ``attack`` command's, a federation's)."""
    import wandb

    check_online_possible(options)
    return wandb.init(
        project=options.project, entity=options.entity, dir=str(run_dir), group=group, job_type=job_type,
        name=name, mode="online" if options.online else "offline", tags=list(options.tags) or None,
        config=config, settings=quiet_settings(),
    )


def make_wandb_logger(
    options: WandbOptions, run_dir: Path, name: str, group: str, job_type: str, config: dict[str, Any]
):
    """A WandbLogger writing under ``run_dir/wandb``; ``group``/``job_type`` let the W&B UI compare arms."""
    from lightning.pytorch.loggers import WandbLogger

    check_online_possible(options)
    mode = "online" if options.online else "offline"
    os.environ["WANDB_MODE"] = mode  # also covers wandb calls made outside the logger (the audit's tables)
    os.environ.setdefault("WANDB_SILENT", "true")
    run_dir.mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        name=name,
        project=options.project,
        entity=options.entity,
        save_dir=str(run_dir),
        offline=not options.online,
        group=group,
        job_type=job_type,
        tags=list(options.tags) or None,
        config=config,
        settings=quiet_settings(),
    )


def finish_wandb() -> None:
    """Close the open run and flush its files.

    A second WandbLogger in one process would otherwise silently reuse the open run. ``wandb.finish`` returns
    before wandb's core process has written the offline ``.wandb`` file; ``teardown`` waits for that, so the run
    folder is complete (and readable by tests or ``wandb sync``) once this returns.
    """
    import wandb

    if wandb.run is not None:
        wandb.finish()
        wandb.teardown()
