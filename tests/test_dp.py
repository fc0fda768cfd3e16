import csv
import json
import math
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from wandb_log import history_keys, read_records, run_log, run_record

from datamodules.digits import DigitsDataModule
from mia_lightning.dp import (
    DPSGD,
    DPConfig,
    as_dp_config,
    check_dp_compatible,
    check_trainer_for_dp,
    choose_grad_sample_mode,
    default_delta,
)
from mia_lightning.target import TargetModule

DP_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_dp.yaml"
pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing")


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path, monkeypatch):
    """Whatever Lightning writes to the working directory lands in the test's folder, not the repository."""
    monkeypatch.chdir(tmp_path)


def datamodule(num_members: int = 200, batch_size: int = 30) -> DigitsDataModule:
    return DigitsDataModule(num_members=num_members, num_nonmembers=100, seed=0, batch_size=batch_size)


def target(dp=None, **kwargs) -> TargetModule:
    kwargs = {"arch": "fc", "arch_kwargs": {"widths": [32]}, "num_classes": 10, "input_shape": (64,), **kwargs}
    torch.manual_seed(0)
    return TargetModule(dp=dp, **kwargs)


def trainer(max_epochs: int = 1, callbacks=(), **kwargs) -> L.Trainer:
    kwargs = {"logger": False, "enable_checkpointing": False, **kwargs}
    return L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1, callbacks=list(callbacks), **kwargs,
    )


def train(model: TargetModule, max_epochs: int = 1, dm=None, ckpt_path=None, **kwargs) -> None:
    L.seed_everything(0, verbose=False)
    trainer(max_epochs, **kwargs).fit(model, datamodule=dm or datamodule(), ckpt_path=ckpt_path)


class BatchSizes(L.Callback):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sizes.append(len(batch[1]))


# -- the config ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of noise_multiplier or target_epsilon"),
        ({"noise_multiplier": 1.0, "target_epsilon": 3.0}, "exactly one of"),
        ({"noise_multiplier": -0.1}, "noise_multiplier must be >= 0"),
        ({"target_epsilon": 0.0}, "target_epsilon must be > 0"),
        ({"target_epsilon": -1.0}, "target_epsilon must be > 0"),
        ({"target_epsilon": math.inf}, "target_epsilon must be > 0 and finite"),
        ({"noise_multiplier": 1.0, "delta": 0.0}, r"delta must lie in \(0, 1\)"),
        ({"noise_multiplier": 1.0, "delta": 1.0}, r"delta must lie in \(0, 1\)"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
        ({"noise_multiplier": 1.0, "max_grad_norm": -1.0}, "max_grad_norm must be > 0"),
        ({"noise_multiplier": 1.0, "accountant": "moments"}, "unknown dp.accountant 'moments'"),
        ({"noise_multiplier": 1.0, "grad_sample_mode": "ew"}, "unknown dp.grad_sample_mode 'ew'"),
    ],
)
def test_config_refuses_values_that_break_the_guarantee(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPConfig(**kwargs)
    with pytest.raises(ValueError, match=match):  # and so does the module, at construction
        target(dp=kwargs)


def test_config_from_a_mapping_names_unknown_keys():
    assert as_dp_config({"target_epsilon": 2.0}) == DPConfig(target_epsilon=2.0)
    assert as_dp_config(None) is None
    with pytest.raises(ValueError, match=r"unknown dp setting\(s\) \['target_epsilom'\]"):
        as_dp_config({"target_epsilom": 2.0})


def test_default_delta_is_one_over_n_rounded_down_to_a_power_of_ten():
    for n in [*range(2, 2000), 9_999, 10_000, 10_001, 50_000, 10**6]:
        delta = default_delta(n)
        exponent = round(math.log10(delta))
        assert delta == 10.0**exponent, n
        assert delta <= 1 / n < 10 * delta, n


# -- the architecture ------------------------------------------------------------------------------------------------
def test_dp_and_a_comparison_arm_get_the_same_groupnorm_architecture():
    images = {"arch": "cnn", "arch_kwargs": {"channels": [8], "norm": "batch"}, "input_shape": (1, 8, 8)}
    dp_arm = target(dp={"noise_multiplier": 1.0}, **images)
    nodp_arm = target(replace_batchnorm=True, **images)
    plain = target(**images)
    assert isinstance(plain.model.norm1, nn.BatchNorm2d)
    assert isinstance(dp_arm.model.norm1, nn.GroupNorm) and isinstance(nodp_arm.model.norm1, nn.GroupNorm)
    assert [(n, type(m)) for n, m in dp_arm.model.named_modules()] == [
        (n, type(m)) for n, m in nodp_arm.model.named_modules()
    ]
    assert {k: v.shape for k, v in dp_arm.model.state_dict().items()} == {
        k: v.shape for k, v in nodp_arm.model.state_dict().items()
    }
    # recorded, so a checkpoint or snapshot rebuilds the same network
    assert dp_arm.hparams.replace_batchnorm is True and plain.hparams.replace_batchnorm is False
    assert dp_arm.hparams.dp == asdict(DPConfig(noise_multiplier=1.0))


class BufferedLinear(nn.Linear):
    def __init__(self) -> None:
        super().__init__(64, 10)
        self.register_buffer("running_scale", torch.ones(1))


def test_a_model_opacus_cannot_train_is_refused_by_name(monkeypatch):
    monkeypatch.setattr("mia_lightning.target.build_model", lambda *a, **k: nn.Sequential(BufferedLinear()))
    with pytest.raises(ValueError, match=r"module '0' \(BufferedLinear\).*buffers \['running_scale'\]"):
        target(dp={"noise_multiplier": 1.0})
    target()  # without DP the same network is fine
    with pytest.raises(ValueError, match=r"module 'norm' \(BatchNorm1d\) cannot be trained with DP-SGD"):
        check_dp_compatible(nn.Sequential(OrderedDict(norm=nn.BatchNorm1d(4))))


def test_auto_mode_uses_ghost_clipping_unless_layers_share_parameters():
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    assert choose_grad_sample_mode(plain, "auto") == "ghost"
    assert choose_grad_sample_mode(tied, "auto") == "hooks"
    assert choose_grad_sample_mode(plain, "functorch") == "functorch"
    with pytest.raises(ValueError, match="'ghost' cannot train a model whose layers share parameters"):
        choose_grad_sample_mode(tied, "ghost")


@pytest.mark.parametrize("mode", ["ghost", "hooks", "functorch"])
def test_clipped_step_matches_a_naive_per_example_loop(mode):
    """One noiseless DP-SGD step (SGD, lr 1) must move the weights by minus the mean of clipped per-example grads."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    reference = [p.detach().clone() for p in model.parameters()]
    per_example = []
    for i in range(len(y)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        per_example.append([p.grad.detach().clone() for p in model.parameters()])
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in grads)) for grads in per_example])
    clip = float(norms.median())  # about half the examples get clipped
    expected = [
        ref - sum(g[k] * min(1.0, clip / float(n)) for g, n in zip(per_example, norms)) / len(y)
        for k, ref in enumerate(reference)
    ]
    model.zero_grad()

    loader = DataLoader(TensorDataset(x, y), batch_size=len(y))
    config = DPConfig(noise_multiplier=0.0, max_grad_norm=clip, poisson_sampling=False, grad_sample_mode=mode)
    dpsgd = DPSGD.attach(model, torch.optim.SGD(model.parameters(), lr=1.0), nn.CrossEntropyLoss(), loader, config,
                         planned_steps=1)
    dpsgd.optimizer.zero_grad()
    dpsgd.criterion(model(x), y).backward()
    dpsgd.optimizer.step()
    dpsgd.detach()
    for got, want in zip(model.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-6)
    assert dpsgd.steps == 1 and dpsgd.epsilon() == math.inf  # no noise, no guarantee


# -- refusals of trainer settings, before any step -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("trainer_kwargs", "match"),
    [
        ({"gradient_clip_val": 1.0}, "gradient_clip_val=1.0 does nothing under DP-SGD"),
        ({"accumulate_grad_batches": 2}, "accumulate_grad_batches=2 is not supported with DP-SGD: Poisson"),
        ({"plugins": [MixedPrecision("16-mixed", "cpu")]}, "precision='16-mixed' is not allowed with DP-SGD"),
        ({"precision": "64-true"}, "precision='64-true' is not allowed"),
        ({"precision": "bf16-mixed"}, "'bf16-mixed' works with ghost clipping only, not dp.grad_sample_mode 'hooks'"),
    ],
)
def test_trainer_settings_that_void_the_guarantee_are_refused_before_training(trainer_kwargs, match):
    model = target(dp={"noise_multiplier": 1.0, "grad_sample_mode": "hooks"})
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        train(model, **trainer_kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_bf16_mixed_trains_with_ghost_clipping():
    model = target(dp={"noise_multiplier": 1.0, "accountant": "rdp"})
    train(model, precision="bf16-mixed")
    assert model.dp_summary()["steps"] == 6 and all(torch.isfinite(p).all() for p in model.parameters())


def test_accumulation_is_refused_without_poisson_sampling_too():
    model = target(dp={"noise_multiplier": 1.0, "poisson_sampling": False})
    with pytest.raises(ValueError, match="accumulate_grad_batches=2 .* one noisy step per batch"):
        train(model, accumulate_grad_batches=2)


def test_multi_device_training_is_refused():
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    with pytest.raises(ValueError, match=r"DP-SGD runs on one device, got 2 device\(s\).*DDPStrategy"):
        check_trainer_for_dp(ddp, DPConfig(noise_multiplier=1.0), "ghost")
    check_trainer_for_dp(trainer(), DPConfig(noise_multiplier=1.0), "ghost")


class ShuffledDigits(DigitsDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.part("members"), batch_size=self.batch_size, shuffle=True)


def test_a_datamodule_that_ignores_poisson_sampling_is_refused():
    dm = ShuffledDigits(num_members=200, num_nonmembers=100, seed=0, batch_size=30)
    with pytest.raises(ValueError, match="does not Poisson-sample .*BatchSampler"):
        train(target(dp={"noise_multiplier": 1.0}), dm=dm)
    train(target(dp={"noise_multiplier": 1.0, "poisson_sampling": False}), dm=dm)  # fine when asked for


# -- accounting ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("accountant", "independent"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_matches_an_independent_accountant_fed_by_hand(tmp_path, accountant, independent):
    """200 members, batch 30: the sampler draws at rate 0.15 for int(1 / 0.15) = 6 batches an epoch, which is not
    Opacus' own guess of 1 / len(loader) = 1/6."""
    sizes = BatchSizes()
    model = target(dp={"noise_multiplier": 1.1, "accountant": accountant})
    train(model, max_epochs=2, callbacks=[sizes], logger=CSVLogger(tmp_path, name="csv"))
    assert len(sizes.sizes) == 12
    by_hand = independent()
    by_hand.history = [(1.1, 30 / 200, 12)]
    expected = by_hand.get_epsilon(delta=1e-3)  # default delta: 1/200 rounded down to a power of ten
    assert model.current_epsilon() == pytest.approx(expected, rel=1e-12)
    summary = model.dp_summary()
    assert summary == {
        "epsilon": pytest.approx(expected, rel=1e-12), "delta": 1e-3, "noise_multiplier": 1.1, "max_grad_norm": 1.0,
        "accountant": accountant, "grad_sample_mode": "ghost", "sample_rate": 30 / 200, "steps": 12,
    }
    with open(next(tmp_path.glob("csv/*/metrics.csv"))) as f:
        logged = [float(row["epsilon"]) for row in csv.DictReader(f) if row.get("epsilon")]
    by_hand.history = [(1.1, 30 / 200, 6)]
    # once per epoch; Lightning logs float32
    assert logged == pytest.approx([by_hand.get_epsilon(delta=1e-3), expected], rel=1e-6)


def test_target_epsilon_is_spent_but_not_exceeded():
    model = target(dp={"target_epsilon": 2.0, "accountant": "rdp", "delta": 1e-4})
    train(model, max_epochs=3)
    summary = model.dp_summary()
    assert summary["steps"] == 18 and summary["delta"] == 1e-4
    assert 2.0 - 0.02 <= summary["epsilon"] <= 2.0


def test_empty_poisson_batches_still_take_their_noise_only_step():
    sizes = BatchSizes()
    model = target(dp={"noise_multiplier": 1.0, "accountant": "rdp", "grad_sample_mode": "hooks"})
    train(model, dm=datamodule(num_members=100, batch_size=1), callbacks=[sizes])
    assert sizes.sizes.count(0) > 0 and len(sizes.sizes) == 100
    assert model.dp_summary()["steps"] == 100
    assert all(torch.isfinite(p).all() for p in model.parameters())


class StopAfter(L.Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 == self.epochs:
            trainer.should_stop = True


def test_a_resumed_run_ends_with_the_same_epsilon_and_weights_as_an_uninterrupted_one(tmp_path):
    dp = {"target_epsilon": 4.0, "accountant": "gdp"}  # gdp: the quickest to solve for
    straight = target(dp=dp)
    train(straight, max_epochs=4)

    interrupted = target(dp=dp)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    train(interrupted, max_epochs=4, callbacks=[checkpoints, StopAfter(2)], enable_checkpointing=True)
    assert interrupted.dp_summary()["steps"] == 12
    resumed = target(dp=dp)
    train(resumed, max_epochs=4, ckpt_path=tmp_path / "last.ckpt")

    assert resumed.dp_summary()["steps"] == 24
    assert resumed.current_epsilon() == pytest.approx(straight.current_epsilon(), abs=1e-9)
    assert resumed.dp_summary()["noise_multiplier"] == straight.dp_summary()["noise_multiplier"]
    for a, b in zip(resumed.parameters(), straight.parameters()):  # same batches and noise drawn
        torch.testing.assert_close(a, b)

    with pytest.raises(ValueError, match="solved to spend target_epsilon=4.0 over 24 steps.*plans 36"):
        train(target(dp=dp), max_epochs=6, ckpt_path=tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match="holds a DP-SGD run"):
        train(target(), max_epochs=4, ckpt_path=tmp_path / "last.ckpt")


def test_a_second_fit_of_the_same_module_keeps_accounting():
    model = target(dp={"noise_multiplier": 1.0, "accountant": "rdp"})
    train(model)
    train(model)
    assert model.dp_summary()["steps"] == 12
    model = target(dp={"target_epsilon": 2.0, "accountant": "gdp"})  # gdp: the quickest to solve for
    train(model)
    with pytest.raises(ValueError, match="already trained under DP-SGD in an earlier fit"):
        train(model)


def test_a_dp_run_cannot_resume_a_non_dp_checkpoint(tmp_path):
    train(target(), max_epochs=1, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        enable_checkpointing=True)
    with pytest.raises(ValueError, match="trained without DP-SGD"):
        train(target(dp={"noise_multiplier": 1.0}), max_epochs=2, ckpt_path=tmp_path / "last.ckpt")


# -- the command line ------------------------------------------------------------------------------------------------
def test_the_dp_config_differs_from_the_default_in_the_training_algorithm_only():
    dp_arm = yaml.safe_load(DP_CONFIG.read_text())
    nodp_arm = yaml.safe_load((DP_CONFIG.parent / "digits.yaml").read_text())
    assert dp_arm["model"].pop("dp")["target_epsilon"] == 8.0
    dp_arm["model"].pop("lr"), nodp_arm["model"].pop("lr")
    assert dp_arm == nodp_arm


def test_cli_dp_run_reports_epsilon_in_metrics_and_wandb(fit):
    run = fit("--config", str(DP_CONFIG), "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
              "--data.init_args.num_members", "200", "--data.init_args.num_nonmembers", "200",
              "--snapshots.epochs", "[]", "--audit.attacks", "[loss]", "--audit.per_epoch_attacks", "[]")
    dp = json.loads(run.metrics.read_text())["target"]["dp"]
    assert {"epsilon", "delta", "noise_multiplier", "max_grad_norm", "accountant", "grad_sample_mode"} <= set(dp)
    assert 8.0 - 0.02 <= dp["epsilon"] <= 8.0 and dp["grad_sample_mode"] == "ghost" and dp["accountant"] == "prv"
    records = read_records(run_log(run.path))
    assert "epsilon" in history_keys(records)
    assert run_record(records).job_type == "target-dp"
    config_keys = {item.key for r in records if r.WhichOneof("record_type") == "config" for item in r.config.update}
    assert {"dp/grad_sample_mode", "dp/noise_multiplier", "replace_batchnorm"} <= config_keys
