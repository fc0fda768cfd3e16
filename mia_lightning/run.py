"""The run folder contract (DESIGN.md): where each artefact of a run lives, and safe updates of metrics.json."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + rename, so a crash never leaves a half-written result behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class RunFolder:
    """``runs/<run_name>/`` with config.yaml, split.npz, checkpoints/, snapshots/, metrics.json, plots/, report.md."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def name(self) -> str:
        return self.path.name

    config = property(lambda self: self.path / "config.yaml")
    split = property(lambda self: self.path / "split.npz")
    checkpoints = property(lambda self: self.path / "checkpoints")
    snapshots = property(lambda self: self.path / "snapshots")
    metrics = property(lambda self: self.path / "metrics.json")
    plots = property(lambda self: self.path / "plots")
    report = property(lambda self: self.path / "report.md")

    def is_finished(self) -> bool:
        """A run is finished once its target section is written (training completed)."""
        return "target" in self.read_metrics()

    def read_metrics(self) -> dict[str, Any]:
        if not self.metrics.exists():
            return {}
        try:
            return json.loads(self.metrics.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.metrics} is not valid JSON: {err}") from err

    def update_metrics(self, **sections: Any) -> dict[str, Any]:
        """Merge top-level sections (``target=...``, ``attacks=...``); attack entries merge by name."""
        metrics = self.read_metrics()
        for key, value in sections.items():
            if key == "attacks" and isinstance(value, dict):
                metrics.setdefault("attacks", {}).update(value)
            else:
                metrics[key] = value
        atomic_write_text(self.metrics, json.dumps(metrics, indent=2, sort_keys=False) + "\n")
        return metrics
