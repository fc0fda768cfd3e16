import json
import subprocess
import sys

import pytest
from wandb_log import history_keys, read_records, run_log, run_record

from mia_lightning.cli import main

QUICK = ("--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false", "--snapshots.epochs", "[]",
         "--audit.attacks", "[loss]", "--audit.per_epoch_attacks", "[]")


def test_fit_writes_the_run_folder_contract(fit):
    run = fit(*QUICK, "--experiment", "exp1")
    assert run.config.is_file() and run.split.is_file()
    assert (run.checkpoints / "last.ckpt").is_file()
    metrics = json.loads(run.metrics.read_text())
    target = metrics["target"]
    assert set(target) >= {"train_acc", "test_acc", "epochs", "dp"}
    assert target["epochs"] == 3 and target["dp"] is None
    assert 0.5 < target["train_acc"] <= 1.0 and 0.5 < target["test_acc"] <= 1.0
    assert "max_epochs: 3" in run.config.read_text()


def test_fit_logs_to_an_offline_wandb_run_that_can_be_read_back(fit):
    run = fit(*QUICK, "--experiment", "exp-wandb")
    records = read_records(run_log(run.path))
    keys = history_keys(records)
    assert {"train_loss", "train_acc", "val_acc", "target/train_acc", "target/test_acc"} <= keys
    info = run_record(records)
    assert info.run_group == "exp-wandb" and info.job_type == "target-nodp" and info.display_name == "t"
    config_keys = {item.key for item in info.config.update}
    assert {"model", "data", "trainer"} <= config_keys


def test_logger_false_turns_wandb_off(fit):
    run = fit(*QUICK, "--trainer.logger", "false")
    assert not (run.path / "wandb").exists() and run.metrics.is_file()


def test_same_config_and_seed_give_the_same_split_and_metrics(fit):
    a = fit(*QUICK, "--trainer.logger", "false", run_name="a")
    b = fit(*QUICK, "--trainer.logger", "false", run_name="b")
    assert a.split.read_bytes() == b.split.read_bytes()
    assert json.loads(a.metrics.read_text())["target"] == json.loads(b.metrics.read_text())["target"]


def test_finished_run_is_never_overwritten_without_asking(fit, tmp_path):
    run = fit(*QUICK, "--trainer.logger", "false")
    before = {p: p.read_bytes() for p in (run.metrics, run.config, run.split)}
    with pytest.raises(ValueError, match="already holds a finished run"):
        fit(*QUICK, "--trainer.logger", "false")
    assert {p: p.read_bytes() for p in before} == before


def test_unnamed_runs_get_fresh_folders(tmp_path):
    runs = tmp_path / "runs"
    for _ in range(2):
        main(["fit", *QUICK, "--trainer.logger", "false", "--runs_dir", str(runs), "--experiment", "e"])
    assert sorted(p.name for p in runs.iterdir()) == ["e", "e-2"]


@pytest.mark.parametrize(
    "args, message",
    [
        (("--model.arch", "no_such_net"), "unknown architecture 'no_such_net'"),
        (("--trainer.max_epochs", "0"), "max_epochs must be >= 1"),
        (("--trainer.max_epochs", "-1"), "max_epochs must be >= 1"),
    ],
)
def test_bad_input_fails_before_any_work(fit, tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        fit(*args, "--trainer.logger", "false")
    run_dir = tmp_path / "runs" / "t"
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()


def test_split_file_from_another_dataset_is_refused_and_kept(fit, tmp_path):
    from datamodules.base import MembershipSplit

    run_dir = tmp_path / "runs" / "t"
    MembershipSplit.draw("purchase100", 5000, 0, num_members=1000).save(run_dir / "split.npz")
    before = (run_dir / "split.npz").read_bytes()
    with pytest.raises(ValueError, match="drawn for dataset 'purchase100'"):
        fit(*QUICK, "--trainer.logger", "false")
    assert (run_dir / "split.npz").read_bytes() == before
    assert sorted(p.name for p in run_dir.iterdir()) == ["split.npz"]


def test_missing_config_file_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(tmp_path / "nope.yaml")])
    assert exc.value.code != 0
    assert "nope.yaml" in capsys.readouterr().err


def test_help_lists_the_subcommands():
    out = subprocess.run([sys.executable, "-m", "mia_lightning", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("fit", "attack", "compare", "federated"):
        assert f"  {command}" in out


def test_print_config_shows_the_default_config_with_overrides():
    out = subprocess.run(
        [sys.executable, "-m", "mia_lightning", "fit", "--print_config", "--trainer.max_epochs", "7"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "max_epochs: 7" in out and "datamodules.digits.DigitsDataModule" in out
