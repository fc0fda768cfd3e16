"""Build parts of a run from saved YAML config sections (used by ``attack`` and ``compare``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jsonargparse import ArgumentParser

from datamodules.base import MembershipDataModule


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(cfg, "data.init_args.seed", 3)``: nested assignment as on the command line."""
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {key!r}: {part!r} is not a section")
    node[last] = value


def instantiate_datamodule(data_section: Mapping[str, Any], split_file: str) -> MembershipDataModule:
    """The DataModule a config's ``data:`` section names, reading/writing its split at ``split_file``."""
    parser = ArgumentParser()
    parser.add_subclass_arguments(MembershipDataModule, "data")
    section = dict(data_section)
    section["init_args"] = {**(section.get("init_args") or {}), "split_file": split_file}
    cfg = parser.parse_object({"data": section})
    return parser.instantiate_classes(cfg).data
