import json

import numpy as np
import pytest
from wandb_log import read_records, run_log, summary_keys

from mia_lightning.audit import DEFAULT_ATTACKS, default_delta, union_spec
from mia_lightning.commands.attack import main as attack_main
from mia_lightning.features import FeatureSpec

FAST = {name: {"max_epochs": 2} for name in ("blackbox_nn", "whitebox", "whitebox_multi_epoch", "unsupervised")}
AUDIT = (
    "--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false",
    "--data.init_args.num_members", "300",
    "--snapshots.epochs", "[1, 2, 3]",
    "--audit.attacks", json.dumps(list(DEFAULT_ATTACKS)),
    "--audit.attack_kwargs", json.dumps(FAST),
    "--audit.per_epoch_attacks", "[loss]",
    "--audit.progress", "false",
)
CONTRACT = {"auc", "accuracy", "advantage", "tpr_at_fpr", "eps_lower_bound", "n_members", "n_nonmembers"}


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    from mia_lightning.cli import main
    from mia_lightning.run import RunFolder

    runs = tmp_path_factory.mktemp("audit") / "runs"
    main(["fit", "--runs_dir", str(runs), "--run_name", "a", *AUDIT])
    return RunFolder(runs / "a")


def test_fit_ends_with_every_attack_in_metrics_report_and_plots(audited):
    metrics = audited.read_metrics()
    assert list(metrics["attacks"]) == [a for a in DEFAULT_ATTACKS if a != "whitebox_multi_epoch"] + [
        "whitebox_multi_epoch"
    ]
    for name, m in metrics["attacks"].items():
        assert CONTRACT <= set(m), name
        assert 0.0 <= m["auc"] <= 1.0 and m["n_members"] == m["n_nonmembers"] == 150
        assert set(m["tpr_at_fpr"]) == {"0.001", "0.01"}
        assert m["tpr_at_fpr"]["0.001"] is None  # 150 non-members cannot resolve 0.1% FPR: no number is made up
    assert metrics["attacks"]["whitebox_multi_epoch"]["snapshot_epochs"] == [1, 2, 3]
    assert metrics["leakage_by_epoch"]["epochs"] == [1, 2, 3] and len(metrics["leakage_by_epoch"]["auc"]["loss"]) == 3
    for path in (audited.report, audited.plots / "roc.png", audited.plots / "leakage_vs_epoch.png"):
        assert path.is_file()
    report = audited.report.read_text()
    assert "| whitebox |" in report and "n/a" in report


def test_audit_is_logged_to_the_runs_wandb_file(audited):
    keys = summary_keys(read_records(run_log(audited.path)))
    assert {"attack/whitebox/auc", "attack/loss/tpr_at_fpr/0.01", "target/test_acc"} <= keys


def test_attack_command_reruns_and_adds_attacks_without_retraining(audited):
    before = audited.read_metrics()
    ckpt = (audited.checkpoints / "last.ckpt").stat().st_mtime_ns
    attack_main(["--run", str(audited.path), "--attacks", "[loss, entropy]", "--progress", "false"])
    after = audited.read_metrics()
    assert after["target"] == before["target"] and (audited.checkpoints / "last.ckpt").stat().st_mtime_ns == ckpt
    assert after["attacks"]["loss"]["auc"] == before["attacks"]["loss"]["auc"]  # same split, same snapshot
    assert set(after["attacks"]) == set(before["attacks"])


def test_attack_command_refuses_missing_or_incomplete_runs(tmp_path, audited):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        attack_main(["--run", str(tmp_path / "nope")])
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text(audited.config.read_text())
    with pytest.raises(FileNotFoundError, match="incomplete: no split.npz, metrics.json"):
        attack_main(["--run", str(tmp_path / "half")])
    with pytest.raises(ValueError, match="unknown attack"):
        attack_main(["--run", str(audited.path), "--attacks", "[no_such_attack]"])


def test_unknown_attack_in_config_fails_before_training(fit, tmp_path):
    with pytest.raises(ValueError, match="unknown attack"):
        fit("--audit.attacks", "[loss, lira_typo]", "--trainer.logger", "false")
    assert not (tmp_path / "runs" / "t" / "checkpoints").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--audit.attack_kwargs", '{"whitebox": {"gradients": ["fc9"]}}'], r"gradient layer\(s\) \['fc9'\]"),
    (["--audit.attack_kwargs", '{"whitebx": {"max_epochs": 3}}'], "unknown attack"),
    (["--audit.attack_kwargs", '{"blackbox_nn": {"no_such_setting": 1}}'], "no_such_setting"),
])
def test_bad_attack_settings_fail_before_training(fit, tmp_path, args, message):
    with pytest.raises((ValueError, TypeError), match=message):
        fit(*args, "--trainer.logger", "false")
    assert not (tmp_path / "runs" / "t" / "checkpoints").exists()
    assert not (tmp_path / "runs" / "t" / "metrics.json").exists()


def test_settings_of_attacks_left_out_on_the_command_line_are_set_aside(fit):
    run = fit("--trainer.max_epochs", "1", "--snapshots.epochs", "[]", "--trainer.logger", "false",
              "--audit.attacks", "[loss]", "--audit.per_epoch_attacks", "[]",
              "--audit.attack_kwargs", '{"whitebox": {"gradients": ["fc3"]}}')
    assert list(run.read_metrics()["attacks"]) == ["loss"]


def test_snapshot_epoch_beyond_max_epochs_fails_before_training(fit, tmp_path):
    with pytest.raises(ValueError, match="beyond trainer.max_epochs"):
        fit("--trainer.max_epochs", "2", "--snapshots.epochs", "[1, 5]", "--trainer.logger", "false")
    assert not (tmp_path / "runs" / "t").exists()


def test_union_spec_and_default_delta():
    spec = union_spec([FeatureSpec(outputs=("output",), gradients=("fc2",)), FeatureSpec(outputs=(), loss=True,
                                                                                         label=False)])
    assert spec.outputs == ("output",) and spec.gradients == ("fc2",) and spec.loss and spec.label
    assert default_delta(250) == pytest.approx(1e-3) and default_delta(20000) == pytest.approx(1e-5)
    assert np.isclose(default_delta(1000), 1e-3)


def test_attack_command_reads_a_run_whose_split_predates_stratification(tmp_path, audited):
    """Runs made before splits were stratified: config.yaml has no ``stratify`` and split.npz is unstratified."""
    import dataclasses
    import shutil

    import yaml

    from datamodules.base import MembershipSplit

    run = tmp_path / "old"
    shutil.copytree(audited.path, run)
    split = MembershipSplit.load(run / "split.npz")
    dataclasses.replace(split, stratified=False).save(run / "split.npz")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["init_args"].pop("stratify")
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    attack_main(["--run", str(run), "--attacks", "[loss]", "--progress", "false"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["attacks"]["loss"]["auc"] == audited.read_metrics()["attacks"]["loss"]["auc"]
