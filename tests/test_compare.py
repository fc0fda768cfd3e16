import csv
import json

import pytest

from mia_lightning.commands.compare import main as compare_main
from mia_lightning.compare import Arm, ComparePlan
from mia_lightning.run import RunFolder

QUICK_COMMON = {
    "trainer.max_epochs": 2,
    "trainer.enable_progress_bar": False,
    "data.init_args.num_members": 300,
    "data.init_args.batch_size": 64,
    "model.replace_batchnorm": True,
    "audit.attacks": ["loss", "confidence"],
    "audit.progress": False,
    "snapshots.epochs": [],
}
ARMS = [
    {"name": "nodp"},
    {"name": "dp", "overrides": {"model.dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}},
]


def write_plan(tmp_path, runs_dir, executor="sequential", common=None):
    import yaml

    plan = {
        "experiment": "cmp",
        "base_config": "configs/digits.yaml",
        "runs_dir": str(runs_dir),
        "executor": executor,
        "threads_per_arm": 1,
        "common": {**QUICK_COMMON, **(common or {})},
        "arms": ARMS,
    }
    path = tmp_path / f"compare_{executor}.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def per_arm_metrics(folder):
    return {arm: json.loads((folder / arm / "metrics.json").read_text()) for arm in ("nodp", "dp")}


@pytest.fixture(scope="module")
def sequential_compare(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cmp")
    runs = tmp_path / "runs"
    compare_main(["--config", str(write_plan(tmp_path, runs))])
    return tmp_path, runs / "cmp"


def test_compare_writes_one_row_per_arm_on_one_split(sequential_compare):
    _, folder = sequential_compare
    rows = list(csv.DictReader((folder / "compare.csv").open()))
    assert [r["arm"] for r in rows] == ["nodp", "dp"]
    assert rows[0]["epsilon"] == "inf" and 0 < float(rows[1]["epsilon"]) < 1e6
    for r in rows:
        assert 0 < float(r["test_acc"]) <= 1 and r["loss_auc"] and r["confidence_tpr@1%fpr"]
    assert "| nodp | inf |" in (folder / "compare.md").read_text()
    for png in ("accuracy_vs_epsilon.png", "leakage_vs_epsilon.png", "roc_arms.png"):
        assert (folder / "plots" / png).is_file()
    metrics = per_arm_metrics(folder)
    assert metrics["nodp"]["target"]["dp"] is None and metrics["dp"]["target"]["dp"]["epsilon"] > 0
    for arm in ("nodp", "dp"):
        config = (folder / arm / "config.yaml").read_text()
        assert str(folder / "split.npz") in config and "replace_batchnorm: true" in config
        assert not (folder / arm / "split.npz").exists()


def test_compare_skips_finished_arms_and_restarts_half_finished_ones(sequential_compare, capsys):
    tmp_path, folder = sequential_compare
    plan_file = tmp_path / "compare_sequential.yaml"
    before = {arm: (folder / arm / "metrics.json").stat().st_mtime_ns for arm in ("nodp", "dp")}
    (folder / "dp" / "report.md").unlink()  # as if the dp arm died during its audit
    compare_main(["--config", str(plan_file)])
    assert "arm nodp: complete, skipped" in capsys.readouterr().out
    assert (folder / "nodp" / "metrics.json").stat().st_mtime_ns == before["nodp"]
    assert (folder / "dp" / "report.md").is_file()
    compare_main(["--config", str(plan_file), "--force", "true"])
    assert (folder / "nodp" / "metrics.json").stat().st_mtime_ns != before["nodp"]


def test_ray_executor_gives_the_same_per_arm_numbers(sequential_compare, tmp_path):
    pytest.importorskip("ray")
    _, seq_folder = sequential_compare
    runs = tmp_path / "runs"
    compare_main(["--config", str(write_plan(tmp_path, runs, executor="ray"))])
    ray_metrics, seq_metrics = per_arm_metrics(runs / "cmp"), per_arm_metrics(seq_folder)
    for arm in ("nodp", "dp"):
        assert ray_metrics[arm]["target"] == seq_metrics[arm]["target"]
        for attack in ("loss", "confidence"):
            assert ray_metrics[arm]["attacks"][attack]["auc"] == seq_metrics[arm]["attacks"][attack]["auc"]


@pytest.mark.parametrize(
    "arms, message",
    [
        ([Arm("a", {"data.init_args.seed": 3})], "arms must share the split"),
        ([Arm("a", {"trainer.max_epochs": 3})], "arms must share"),
        ([Arm("a"), Arm("a")], "unique"),
        ([], "at least one arm"),
    ],
)
def test_bad_plans_are_refused(arms, message):
    with pytest.raises(ValueError, match=message):
        ComparePlan(experiment="x", base_config="configs/digits.yaml", arms=arms)


def test_missing_base_config_and_unknown_executor_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="base_config"):
        ComparePlan(experiment="x", base_config=str(tmp_path / "none.yaml"), arms=[Arm("a")])
    with pytest.raises(ValueError, match="unknown executor"):
        ComparePlan(experiment="x", base_config="configs/digits.yaml", arms=[Arm("a")], executor="slurm")


def test_run_folder_is_finished_only_after_target_metrics(tmp_path):
    run = RunFolder(tmp_path / "r")
    assert not run.is_finished()
    run.update_metrics(attacks={"loss": {"auc": 0.5}})
    assert not run.is_finished()
    run.update_metrics(target={"train_acc": 1.0})
    assert run.is_finished() and run.read_metrics()["attacks"]["loss"]["auc"] == 0.5
