"""``python -m mia_lightning``: train a target, audit its leakage, compare DP arms, attack federated learning.

``fit``/``validate``/``test`` go through LightningCLI (configs, ``--print_config``, dotted overrides); ``attack``,
``compare`` and ``federated`` are orchestration commands with their own parsers.
"""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks.audit import MembershipAudit
from callbacks.snapshot import ParameterSnapshot
from datamodules.base import MembershipDataModule
from mia_lightning.run import RunFolder, atomic_write_text
from mia_lightning.target import TargetModule
from mia_lightning.wandb_setup import WandbOptions, finish_wandb, make_wandb_logger

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "digits.yaml"

ORCHESTRATION_COMMANDS = {
    "attack": "re-run or add attacks on a finished run, without retraining (attack --run runs/<name>)",
    "compare": "train matched DP / non-DP arms on one split and tabulate leakage (compare --config ...)",
    "federated": "FedAvg with passive and active membership attackers (federated --config ...)",
}
TRAINER_COMMANDS = {
    "fit": "train a target model and audit its leakage (default config: configs/digits.yaml)",
    "validate": "evaluate a target model on the non-members",
    "test": "evaluate a target model on the non-members",
}


class MiaCLI(LightningCLI):
    """LightningCLI plus the run folder contract, W&B defaults and the end-of-fit audit."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            TargetModule,
            MembershipDataModule,
            subclass_mode_data=True,
            save_config_callback=None,
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="folder name under runs_dir (default: the experiment name, made unique)")
        parser.add_argument("--runs_dir", type=str, default="runs", help="where run folders are created")
        parser.add_argument("--experiment", type=str, default="mia", help="W&B group and default run name")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="replace a finished run of the same name instead of refusing")
        parser.add_dataclass_arguments(WandbOptions, "wandb")
        parser.add_lightning_class_args(ParameterSnapshot, "snapshots")
        parser.set_defaults({"snapshots.last": True})
        parser.add_lightning_class_args(MembershipAudit, "audit")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.input_shape", apply_on="instantiate")

    # -- before anything is built: the run folder and settings that would fail late --------------------------
    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        max_epochs = cfg.trainer.max_epochs
        if max_epochs is None or max_epochs < 1:
            raise ValueError(f"trainer.max_epochs must be >= 1, got {max_epochs}")
        beyond = [e for e in cfg.snapshots.epochs or [] if e > max_epochs]
        if beyond:
            raise ValueError(f"snapshots.epochs {beyond} lie beyond trainer.max_epochs={max_epochs}")
        runs_dir = Path(cfg.runs_dir)
        if cfg.run_name:
            run = RunFolder(runs_dir / cfg.run_name)
            if self.subcommand == "fit" and run.is_finished() and not cfg.overwrite:
                raise ValueError(
                    f"run folder {run.path} already holds a finished run; choose another --run_name, "
                    "or pass --overwrite true to replace it"
                )
        else:
            run = RunFolder(runs_dir / cfg.experiment)
            suffix = 1
            while run.is_finished():
                suffix += 1
                run = RunFolder(runs_dir / f"{cfg.experiment}-{suffix}")
        self.run_folder = run
        cfg.run_name = run.name
        cfg.trainer.default_root_dir = str(run.path)
        if cfg.data.init_args.get("split_file") is None:
            cfg.data.init_args.split_file = str(run.split)

    def instantiate_trainer(self, **kwargs: Any):
        cfg = self.config[self.subcommand]
        trainer_cfg = dict(self._get(self.config_init, "trainer", default={}))
        if trainer_cfg.get("logger") in (None, True):
            is_dp = getattr(self.model, "is_private", lambda: False)()
            trainer_cfg["logger"] = make_wandb_logger(
                WandbOptions(**dict(cfg.wandb)),
                run_dir=self.run_folder.path,
                name=self.run_folder.name,
                group=cfg.experiment,
                job_type="target-dp" if is_dp else "target-nodp",
                config=self.config_as_dict(),
            )
        callbacks = list(trainer_cfg.get("callbacks") or [])
        if trainer_cfg.get("enable_checkpointing", True) is not False and not any(
            isinstance(c, ModelCheckpoint) for c in callbacks
        ):
            callbacks.append(ModelCheckpoint(dirpath=str(self.run_folder.checkpoints), save_last=True))
        trainer_cfg["callbacks"] = callbacks
        extra = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        return self._instantiate_trainer({**trainer_cfg, **kwargs}, extra)

    def config_as_dict(self) -> dict[str, Any]:
        return self.config[self.subcommand].clone().as_dict()

    # -- fit: validate the split, record the config, train, audit --------------------------------------------
    def before_fit(self) -> None:
        cfg = self.config[self.subcommand]
        if cfg.overwrite and self.run_folder.is_finished():
            for child in self.run_folder.path.iterdir():
                if child != self.run_folder.split:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        self.datamodule.prepare_split()
        text = self._parser(self.subcommand).dump(cfg, skip_none=False)
        atomic_write_text(self.run_folder.config, text)

    def after_fit(self) -> None:
        finish_wandb()
        metrics = self.run_folder.read_metrics()
        target = metrics.get("target", {})
        if target:
            print(
                f"\nrun folder: {self.run_folder.path}\n"
                f"target: train_acc={target['train_acc']:.4f} test_acc={target['test_acc']:.4f} "
                f"epochs={target['epochs']}"
            )


def print_overview() -> None:
    lines = ["usage: python -m mia_lightning <command> [options]", "", "commands:"]
    for name, text in {**TRAINER_COMMANDS, **ORCHESTRATION_COMMANDS}.items():
        lines.append(f"  {name:<10} {text}")
    lines += ["", "`python -m mia_lightning <command> --help` shows a command's options."]
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print_overview()
        return
    command = argv[0]
    if command in TRAINER_COMMANDS:
        if not any(a == "--config" or a.startswith("--config=") for a in argv) and DEFAULT_CONFIG.exists():
            # The default config applies only when none is given, so other configs inherit nothing from it.
            argv = [command, "--config", str(DEFAULT_CONFIG), *argv[1:]]
            from_command_line = False
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        MiaCLI(args=None if from_command_line else argv)
        return
    if command in ORCHESTRATION_COMMANDS:
        import importlib

        importlib.import_module(f"mia_lightning.commands.{command}").main(argv[1:])
        return
    print(f"unknown command {command!r}\n", file=sys.stderr)
    print_overview()
    raise SystemExit(2)
