"""``python -m mia_lightning federated [--config configs/federated/<name>.yaml]``: FedAvg under passive and active
membership-inference attackers (Nasr et al. 2019, Table X), one run folder with every attacker's results. Without
--config: configs/federated/purchase_synthetic.yaml (the setting that reproduces the paper's ordering)."""

from __future__ import annotations

import shutil
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from datamodules.base import MembershipDataModule
from mia_lightning.federated.experiment import AttackerConfig, FederatedExperiment, FederationConfig
from mia_lightning.federated.results import log_to_wandb, write_results
from mia_lightning.report import print_attack_table
from mia_lightning.run import RunFolder, atomic_write_text
from mia_lightning.target import TargetModule
from mia_lightning.wandb_setup import WandbOptions, check_online_possible

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "federated" / "purchase_synthetic.yaml"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m mia_lightning federated", description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="a federated config (see configs/federated/)")
    parser.add_argument("--experiment", type=str, default="federated", help="W&B group and default run name")
    parser.add_argument("--run_name", type=str | None, default=None,
                        help="folder name under runs_dir (default: the experiment name, made unique)")
    parser.add_argument("--runs_dir", type=str, default="runs", help="where run folders are created")
    parser.add_argument("--overwrite", type=bool, default=False,
                        help="replace a finished run of the same name instead of refusing")
    parser.add_argument("--seed", type=int, default=0,
                        help="initial model, shares, attacker records, batches and attack models")
    parser.add_argument("--progress", type=bool, default=True, help="progress bars for training and attacks")
    parser.add_argument("--log_wandb", type=bool, default=True, help="write a W&B run (offline unless wandb.online)")
    parser.add_dataclass_arguments(WandbOptions, "wandb")
    parser.add_subclass_arguments(MembershipDataModule, "data", required=True)
    parser.add_class_arguments(TargetModule, "model", skip={"num_classes", "input_shape"}, instantiate=False)
    parser.add_class_arguments(FederationConfig, "federation", instantiate=False)
    parser.add_class_arguments(AttackerConfig, "attacker", instantiate=False)
    return parser


def resolve_run_folder(cfg: Namespace) -> RunFolder:
    """As ``fit`` does: a named run is never overwritten unless asked; an unnamed one gets a fresh folder."""
    runs_dir = Path(cfg.runs_dir)
    if cfg.run_name:
        run = RunFolder(runs_dir / cfg.run_name)
        if run.is_finished() and not cfg.overwrite:
            raise ValueError(
                f"run folder {run.path} already holds a finished run; choose another --run_name, "
                "or pass --overwrite true to replace it"
            )
        return run
    run, suffix = RunFolder(runs_dir / cfg.experiment), 1
    while run.is_finished():
        suffix += 1
        run = RunFolder(runs_dir / f"{cfg.experiment}-{suffix}")
    return run


def clear_run_folder(run: RunFolder) -> None:
    """Remove what an earlier (finished or interrupted) run left, except the split it shares with this one."""
    if not run.path.is_dir():
        return
    for child in run.path.iterdir():
        if child != run.split:
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def main(argv: list[str]) -> None:
    if not any(a == "--config" or a.startswith("--config=") for a in argv) and DEFAULT_CONFIG.exists():
        argv = ["--config", str(DEFAULT_CONFIG), *argv]  # only when none is given: other configs inherit nothing
    parser = build_parser()
    cfg = parser.parse_args(argv)
    run = resolve_run_folder(cfg)
    federation = FederationConfig(**cfg.federation.as_dict())
    attacker = AttackerConfig(**cfg.attacker.as_dict())
    wandb_options = WandbOptions(**cfg.wandb.as_dict())
    if cfg.log_wandb:
        check_online_possible(wandb_options)
    cfg.run_name = run.name
    if cfg.data.init_args.get("split_file") is None:
        cfg.data.init_args.split_file = str(run.split)
    data = parser.instantiate_classes(cfg).data
    experiment = FederatedExperiment(data, cfg.model.as_dict(), federation, attacker, run, cfg.seed, cfg.progress)
    clear_run_folder(run)
    atomic_write_text(run.config, parser.dump(cfg, skip_none=False))
    metrics, scores = experiment.run_all()
    write_results(run, metrics, scores)
    print_attack_table(metrics["attacks"], metrics["target"], title=f"federated membership inference: {run.name}")
    print(f"run folder: {run.path}")
    if cfg.log_wandb:
        log_to_wandb(run, wandb_options, cfg.experiment, cfg.clone().as_dict(), metrics, scores)
