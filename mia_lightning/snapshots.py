"""Parameter snapshots: one safetensors file per saved epoch, with the metadata needed to rebuild the model.

The multi-epoch white-box attack observes a target model at several points of its training, so the snapshots
must be exact copies (not views of live tensors), safe to load (safetensors, no pickle), and self-describing
(epoch, step, epsilon, and the architecture to rebuild the network from ``mia_lightning.models``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from mia_lightning.dp import fix_for_dp
from mia_lightning.models import build_model

SNAPSHOT_DIRNAME = "snapshots"
SNAPSHOT_PATTERN = re.compile(r"^epoch_(\d+)\.safetensors$")
# Opacus' GradSampleModule (make_private with wrap_model=True) prefixes every key with this.
OPACUS_PREFIX = "_module."
REBUILD_KEYS = ("arch", "num_classes", "input_shape")


@dataclass(frozen=True)
class Snapshot:
    """The parameters (and buffers) of a model at one epoch, with the metadata they were saved with."""

    path: Path
    state_dict: dict[str, Tensor]
    metadata: dict[str, Any]

    @property
    def epoch(self) -> int:
        return int(self.metadata["epoch"])


def snapshot_filename(epoch: int) -> str:
    return f"epoch_{epoch:03d}.safetensors"


def clean_state_dict(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached CPU copies without Opacus' ``_module.`` prefix, so the keys match ``build_model``'s network.

    Copies, because ``.cpu()`` of a CPU tensor is the live tensor itself and training would overwrite it.
    """
    if isinstance(model_or_state_dict, nn.Module):
        state = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state = model_or_state_dict
    else:
        raise ValueError(f"expected an nn.Module or a state dict, got {type(model_or_state_dict).__name__}")
    if state and all(key.startswith(OPACUS_PREFIX) for key in state):
        state = {key[len(OPACUS_PREFIX) :]: value for key, value in state.items()}
    cleaned = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise ValueError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")
        cleaned[key] = value.detach().to("cpu", copy=True).contiguous()
    return cleaned


def save_snapshot(
    path: str | os.PathLike,
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    metadata: Mapping[str, Any],
) -> Path:
    """Write the snapshot atomically (temp file + ``os.replace``): a reader never sees a half-written file.

    ``metadata`` must hold ``epoch``; every value is stored JSON-encoded (safetensors metadata is str -> str).
    """
    path = Path(path)
    if "epoch" not in metadata:
        raise ValueError(f"snapshot metadata for {path} needs an 'epoch'; got keys {sorted(metadata)}")
    try:
        encoded = {str(key): json.dumps(value) for key, value in metadata.items()}
    except TypeError as err:
        raise ValueError(f"snapshot metadata for {path} must be JSON-serialisable: {err}") from err
    tensors = clean_state_dict(model_or_state_dict)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, tmp_path, metadata=encoded)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def load_snapshot(path: str | os.PathLike) -> Snapshot:
    """Load a snapshot, refusing a truncated or foreign file, or one without its metadata, by name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no snapshot file at {path}")
    try:
        with safe_open(path, framework="pt") as handle:
            raw = handle.metadata() or {}
            state_dict = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors snapshot: {err}") from err
    try:
        metadata = {key: json.loads(value) for key, value in raw.items()}
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{path} has metadata that is not JSON-encoded: {err}") from err
    if "epoch" not in metadata:
        raise ValueError(f"{path} has no 'epoch' in its metadata (keys: {sorted(metadata)}): not a snapshot")
    return Snapshot(path=path, state_dict=state_dict, metadata=metadata)


def list_snapshots(run_dir: str | os.PathLike) -> list[Path]:
    """The ``epoch_NNN.safetensors`` files under ``<run_dir>/snapshots``, sorted by epoch."""
    snapshot_dir = Path(run_dir) / SNAPSHOT_DIRNAME
    if not snapshot_dir.is_dir():
        raise FileNotFoundError(f"no snapshot folder at {snapshot_dir}")
    found = [(int(m.group(1)), p) for p in snapshot_dir.iterdir() if (m := SNAPSHOT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def model_from_snapshot(path: str | os.PathLike) -> nn.Module:
    """Rebuild the network through ``build_model`` from the metadata and load the parameters strictly.

    With ``replace_batchnorm`` in the metadata, BatchNorm is replaced as TargetModule did (``fix_for_dp``).

    Returned in eval mode: snapshots are read for auditing, not for further training.
    """
    snapshot = load_snapshot(path)
    meta = snapshot.metadata
    missing = [key for key in REBUILD_KEYS if key not in meta]
    if missing:
        raise ValueError(f"{snapshot.path} cannot be rebuilt: metadata lacks {missing} (has {sorted(meta)})")
    arch_kwargs = meta.get("arch_kwargs") or {}
    if not isinstance(arch_kwargs, dict):
        raise ValueError(f"{snapshot.path}: arch_kwargs must be a mapping, got {arch_kwargs!r}")
    try:
        model = build_model(meta["arch"], int(meta["num_classes"]), tuple(meta["input_shape"]), **arch_kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{snapshot.path}: cannot build {meta['arch']!r} from its metadata: {err}") from err
    if meta.get("replace_batchnorm"):  # TargetModule swapped BatchNorm for GroupNorm (DP, or both arms)
        model, _ = fix_for_dp(model)
    try:
        model.load_state_dict(snapshot.state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{snapshot.path} does not match architecture {meta['arch']!r} {arch_kwargs}: {err}"
        ) from err
    return model.eval()
