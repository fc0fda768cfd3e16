"""Parameter snapshots: the safetensors files, and the Lightning callback that writes them during training."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import wandb
from lightning.pytorch.loggers import WandbLogger
from opacus import GradSampleModule
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from callbacks.snapshot import ParameterSnapshot
from mia_lightning.models import build_model
from mia_lightning.snapshots import (
    clean_state_dict,
    list_snapshots,
    load_snapshot,
    model_from_snapshot,
    save_snapshot,
)
from mia_lightning.target import TargetModule

ARCH = {"arch": "fc", "arch_kwargs": {"widths": [8]}, "num_classes": 3, "input_shape": [4]}
RECORDS, BATCH = 32, 8  # 4 optimizer steps per epoch


class TinyTarget(pl.LightningModule):
    """Like TargetModule: the network at .model, the architecture in hparams, an optional DP epsilon."""

    def __init__(self, epsilon: float | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ARCH)
        self.model = build_model("fc", 3, (4,), widths=[8])
        self.epsilon = epsilon
        self.steps = 0

    def current_epsilon(self) -> float | None:
        return self.epsilon

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class StateRecorder(pl.Callback):
    """The parameters at the end of every epoch, as the snapshot callback should have seen them."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        state = pl_module.model.state_dict()
        self.states[trainer.current_epoch + 1] = {k: v.detach().clone() for k, v in state.items()}


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(RECORDS, 4, generator=generator)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()), batch_size=BATCH)


def trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    options = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
    )
    return pl.Trainer(callbacks=callbacks, **{**options, **kwargs})


def saved_model(tmp_path):
    torch.manual_seed(0)
    model = build_model("fc", 3, (4,), widths=[8])
    path = save_snapshot(tmp_path / "snapshots" / "epoch_002.safetensors", model, {"epoch": 2, **ARCH})
    return model, path


def test_callback_snapshots_differ_across_epochs_and_reload_exactly(tmp_path):
    recorder = StateRecorder()
    module = TinyTarget(epsilon=2.5)
    trainer(tmp_path, [ParameterSnapshot(epochs=[1, 3]), recorder], max_epochs=3).fit(module, loader())

    paths = list_snapshots(tmp_path)
    assert [p.name for p in paths] == ["epoch_001.safetensors", "epoch_003.safetensors"]
    first, last = load_snapshot(paths[0]), load_snapshot(paths[1])
    for snapshot in (first, last):
        expected = recorder.states[snapshot.epoch]
        assert snapshot.state_dict.keys() == expected.keys()
        assert all(torch.equal(snapshot.state_dict[k], expected[k]) for k in expected)
    assert not torch.equal(first.state_dict["fc1.weight"], last.state_dict["fc1.weight"])
    assert first.metadata == {"epoch": 1, "global_step": 4, "epsilon": 2.5, **ARCH}
    assert last.metadata["global_step"] == 12

    rebuilt = model_from_snapshot(paths[1])
    x = torch.randn(5, 4)
    assert not rebuilt.training
    torch.testing.assert_close(rebuilt(x), module.model.eval()(x), rtol=0, atol=0)


def test_target_module_with_batchnorm_replaced_is_rebuilt_from_its_snapshot(tmp_path):
    module = TargetModule(
        arch="cnn",
        arch_kwargs={"channels": [3], "hidden": 8, "norm": "batch"},
        num_classes=3,
        input_shape=(1, 8, 8),
        replace_batchnorm=True,
    )
    x = torch.randn(RECORDS, 1, 8, 8)
    data = DataLoader(TensorDataset(x, torch.randint(0, 3, (RECORDS,))), batch_size=BATCH)
    trainer(tmp_path, [ParameterSnapshot(last=True)], max_epochs=1).fit(module, data)

    rebuilt = model_from_snapshot(tmp_path / "snapshots" / "epoch_001.safetensors")
    assert isinstance(rebuilt.norm1, torch.nn.GroupNorm)
    torch.testing.assert_close(rebuilt(x), module.model.eval()(x), rtol=0, atol=0)


def test_every_n_epochs_and_last_when_training_stops_early(tmp_path):
    snapshots = ParameterSnapshot(every_n_epochs=2, last=True, dirpath=tmp_path / "elsewhere")
    module = TinyTarget()
    trainer(tmp_path, [snapshots], max_epochs=5, max_steps=3 * RECORDS // BATCH).fit(module, loader())

    assert sorted(p.name for p in (tmp_path / "elsewhere").iterdir()) == [
        "epoch_002.safetensors",
        "epoch_003.safetensors",
    ]
    assert "epsilon" not in load_snapshot(tmp_path / "elsewhere" / "epoch_003.safetensors").metadata


@pytest.mark.parametrize(
    ("callback", "match"),
    [
        (ParameterSnapshot(epochs=[1, 3]), r"epochs \[3\] are beyond trainer.max_epochs=2"),
        (ParameterSnapshot(every_n_epochs=5), r"every_n_epochs=5 exceeds trainer.max_epochs=2"),
        (ParameterSnapshot(epochs=[1], log_artifact=True), "needs a WandbLogger"),
    ],
)
def test_bad_snapshot_plan_is_refused_before_training(tmp_path, callback, match):
    module = TinyTarget()
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, [callback], max_epochs=2).fit(module, loader())
    assert module.steps == 0
    assert not (tmp_path / "snapshots").exists()


def test_snapshot_arguments_are_checked():
    with pytest.raises(ValueError, match="needs epochs, every_n_epochs or last"):
        ParameterSnapshot()
    with pytest.raises(ValueError, match=r"count from 1 .* got \[0\]"):
        ParameterSnapshot(epochs=[0, 2])
    with pytest.raises(ValueError, match="every_n_epochs must be a positive int"):
        ParameterSnapshot(every_n_epochs=0)


def test_snapshots_are_logged_as_wandb_artifact_versions(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(project="snapshot-test", save_dir=str(tmp_path), offline=True)
    run = logger.experiment
    logged = []
    log_artifact = run.log_artifact

    def recording_log_artifact(artifact, aliases):
        # What reached W&B (its offline file is written asynchronously, so read the calls instead).
        logged.append((artifact, aliases))
        return log_artifact(artifact, aliases=aliases)

    monkeypatch.setattr(run, "log_artifact", recording_log_artifact)
    try:
        callback = ParameterSnapshot(epochs=[1, 2], log_artifact=True)
        trainer(tmp_path, [callback], max_epochs=2, logger=logger).fit(TinyTarget(), loader())
    finally:
        wandb.finish()
    assert [aliases for _, aliases in logged] == [["epoch_001"], ["epoch_002"]]
    for epoch, (artifact, _) in enumerate(logged, start=1):
        assert artifact.name.startswith(f"snapshots-{run.id}") and artifact.type == "model"
        assert artifact.metadata["epoch"] == epoch and artifact.metadata["arch"] == "fc"
        assert list(artifact.manifest.entries) == [f"epoch_{epoch:03d}.safetensors"]


def test_saved_snapshot_is_a_copy_and_roundtrips(tmp_path):
    model, path = saved_model(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copies = clean_state_dict(model)
    with torch.no_grad():
        model.fc1.weight.add_(1.0)
    assert torch.equal(copies["fc1.weight"], before["fc1.weight"])
    snapshot = load_snapshot(path)
    assert snapshot.epoch == 2 and snapshot.path == path
    assert all(torch.equal(snapshot.state_dict[k], before[k]) for k in before)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_opacus_wrapped_model_is_saved_without_prefix(tmp_path):
    model = build_model("fc", 3, (4,), widths=[8])
    wrapped = GradSampleModule(model)
    assert all(k.startswith("_module.") for k in wrapped.state_dict())
    path = save_snapshot(tmp_path / "epoch_001.safetensors", wrapped, {"epoch": 1, **ARCH})
    assert set(load_snapshot(path).state_dict) == set(model.state_dict())
    assert torch.equal(model_from_snapshot(path).fc1.weight, model.fc1.weight)


def test_list_snapshots_sorts_by_epoch(tmp_path):
    folder = tmp_path / "snapshots"
    folder.mkdir()
    for name in ("epoch_010.safetensors", "epoch_1000.safetensors", "epoch_002.safetensors", "notes.txt"):
        (folder / name).touch()
    assert [p.name for p in list_snapshots(tmp_path)] == [
        "epoch_002.safetensors",
        "epoch_010.safetensors",
        "epoch_1000.safetensors",
    ]
    with pytest.raises(FileNotFoundError, match="no snapshot folder"):
        list_snapshots(tmp_path / "missing")


def test_corrupt_or_mismatched_snapshots_are_refused_by_name(tmp_path):
    _, path = saved_model(tmp_path)
    data = path.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, bare)
    for bad, match in [(truncated, "not a readable"), (garbage, "not a readable"), (bare, "no 'epoch'")]:
        with pytest.raises(ValueError, match=f"{bad.name}.*{match}"):
            load_snapshot(bad)

    wider = save_snapshot(
        tmp_path / "wider.safetensors",
        load_snapshot(path).state_dict,
        {"epoch": 2, **ARCH, "arch_kwargs": {"widths": [16]}},
    )
    with pytest.raises(ValueError, match="wider.safetensors does not match architecture 'fc'"):
        model_from_snapshot(wider)
    typo = save_snapshot(
        tmp_path / "typo.safetensors",
        load_snapshot(path).state_dict,
        {"epoch": 2, **ARCH, "arch_kwargs": {"widht": [8]}},
    )
    with pytest.raises(ValueError, match="typo.safetensors: cannot build 'fc'"):
        model_from_snapshot(typo)
    anonymous = save_snapshot(
        tmp_path / "anonymous.safetensors", load_snapshot(path).state_dict, {"epoch": 2}
    )
    with pytest.raises(ValueError, match=r"anonymous.safetensors cannot be rebuilt: metadata lacks \['arch'"):
        model_from_snapshot(anonymous)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_snapshot(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="needs an 'epoch'"):
        save_snapshot(tmp_path / "x.safetensors", {"w": torch.zeros(1)}, {})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_snapshot(tmp_path / "x.safetensors", {"w": torch.zeros(1)}, {"epoch": 1, "bad": object()})
