"""``python -m mia_lightning compare --config configs/compare/digits.yaml``: matched arms, one table."""

from __future__ import annotations

from jsonargparse import ActionConfigFile, ArgumentParser

from mia_lightning.compare import ComparePlan, run_compare


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m mia_lightning compare", description=__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="a compare config (see configs/compare/)")
    parser.add_class_arguments(ComparePlan, as_positional=False)
    parser.add_argument("--force", type=bool, default=False, help="rerun arms that already finished")
    return parser


def main(argv: list[str]) -> None:
    parser = build_parser()
    cfg = parser.parse_args(argv)
    force = cfg.pop("force")
    cfg.pop("config", None)
    plan = parser.instantiate_classes(cfg)
    run_compare(ComparePlan(**{k: v for k, v in plan.as_dict().items() if k != "__path__"}), force=force)
