"""The paper's datasets: tabular loaders on generated files, CIFAR in torchvision's format, synthetic data, configs."""

import csv
import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from datamodules.base import MembershipSplit
from datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from datamodules.synthetic import SyntheticPurchaseDataModule, class_prototypes, make_synthetic_purchase
from datamodules.tabular import (
    LocationDataModule,
    Purchase100DataModule,
    Texas100DataModule,
    read_binary_table,
)
from mia_lightning.cli import main

REPO = Path(__file__).resolve().parent.parent
FIT_CONFIGS = sorted([*REPO.glob("configs/*.yaml"), *REPO.glob("configs/paper/*.yaml")])
SPLIT = dict(num_members=100, num_nonmembers=150, attack_train_members=40, attack_train_nonmembers=40,
             attack_test_members=50, attack_test_nonmembers=60)


# -- generated files -------------------------------------------------------------------------------------------
def binary_records(n: int, d: int, num_classes: int, seed: int = 0, one_based: bool = True):
    rng = np.random.default_rng(seed)
    x = (rng.random((n, d)) < 0.1).astype(np.int64)
    y = np.arange(n) % num_classes + (1 if one_based else 0)  # every class present: min and max labels occur
    return x, rng.permutation(y)


def write_csv(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(",".join(str(v) for v in row) + "\n" for row in rows))
    return path


def slow_read(path: Path, labels_path: Path | None = None):
    """The obvious reader: Python's csv module, label first unless a labels file is given."""
    with open(path, newline="") as f:
        rows = [[int(float(v)) for v in row] for row in csv.reader(f) if row]
    if labels_path is None:
        return np.array([r[1:] for r in rows]), np.array([r[0] for r in rows])
    return np.array(rows), np.array([int(line) for line in labels_path.read_text().split()])


def test_purchase_label_first_csv_matches_the_obvious_reader_and_maps_labels_to_zero_based(tmp_path):
    x, y = binary_records(300, 600, 100)
    path = write_csv(tmp_path / "dataset_purchase", np.column_stack([y, x]))
    features, labels = read_binary_table(path, 600, 100)
    slow_x, slow_y = slow_read(path)
    assert features.dtype == np.uint8 and labels.dtype == np.int64
    np.testing.assert_array_equal(features, slow_x)
    np.testing.assert_array_equal(labels, slow_y - 1)
    assert labels.min() == 0 and labels.max() == 99


def test_purchase_datamodule_shapes_and_split_sizes(tmp_path):
    x, y = binary_records(300, 600, 100)
    path = write_csv(tmp_path / "p.csv", np.column_stack([y, x]))
    dm = Purchase100DataModule(path=str(path), **SPLIT)
    dm.setup()
    assert dm.dataset_name == "purchase100" and dm.num_classes == 100 and dm.input_shape == (600,)
    assert dm.split.sizes() == {"members": 100, "nonmembers": 150, "attack_train_members": 40,
                                "attack_train_nonmembers": 40, "attack_test_members": 50,
                                "attack_test_nonmembers": 60}
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (64, 600) and xb.dtype == torch.float32 and yb.max() < 100
    members = dm.split.members
    np.testing.assert_array_equal(dm.eval_dataset.tensors[0][members].numpy(), x[members])
    np.testing.assert_array_equal(dm.eval_dataset.tensors[1][members].numpy(), y[members] - 1)


def test_texas_two_file_form_and_single_csv_give_the_same_records(tmp_path):
    x, y = binary_records(40, 6170, 20, seed=1)
    feats = write_csv(tmp_path / "texas" / "feats", x)
    (tmp_path / "texas" / "labels").write_text("".join(f"{v}\n" for v in y))
    two_file = read_binary_table(feats, 6170, 100)  # labels from the sibling `labels` file
    single = read_binary_table(write_csv(tmp_path / "texas.csv", np.column_stack([y, x])), 6170, 100)
    slow_x, slow_y = slow_read(feats, tmp_path / "texas" / "labels")
    for features, labels in (two_file, single):
        np.testing.assert_array_equal(features, slow_x)
        np.testing.assert_array_equal(labels, slow_y)  # 1..20 is not 1..100: already valid, kept as is
    moved = tmp_path / "elsewhere.txt"
    moved.write_text((tmp_path / "texas" / "labels").read_text())
    dm = Texas100DataModule(path=str(feats), labels_path=str(moved), num_members=20)
    dm.setup()
    assert dm.input_shape == (6170,) and len(dm.eval_dataset) == 40 and len(dm.split.members) == 20


def test_location_quoted_labels_1_to_30(tmp_path):
    x, y = binary_records(90, 446, 30, seed=2)
    path = tmp_path / "bangkok"
    path.write_text("".join(f'"{label}",' + ",".join(map(str, row)) + "\n" for label, row in zip(y, x)))
    dm = LocationDataModule(path=str(path), num_members=40)
    dm.setup()
    features, labels = dm.eval_dataset.tensors
    assert features.shape == (90, 446) and dm.num_classes == 30
    np.testing.assert_array_equal(labels.numpy(), y - 1)


def test_npz_with_one_hot_labels_and_float_csv(tmp_path):
    x, y = binary_records(60, 446, 30, one_based=False)
    np.savez(tmp_path / "loc.npz", features=x.astype(np.float32), labels=np.eye(30)[y])
    features, labels = read_binary_table(tmp_path / "loc.npz", 446, 30)
    np.testing.assert_array_equal(features, x)
    np.testing.assert_array_equal(labels, y)
    float_csv = tmp_path / "float.csv"
    np.savetxt(float_csv, np.column_stack([y, x]).astype(float), fmt="%.1f", delimiter=",")
    features, labels = read_binary_table(float_csv, 446, 30)
    np.testing.assert_array_equal(features, x)
    np.testing.assert_array_equal(labels, y)


@pytest.mark.parametrize(
    "lines, message",
    [
        (["1," + ",".join(["0"] * 9)], "rows have 10 fields; expected 9 .* or 8"),
        (["1,0,1,0,1,0,1,0,2"], r"features must be binary .* record 0, feature 7 is 2"),
        (["1,0,1,0,1,0,1,0,0.5"], "features must be binary"),
        (["0,0,0,0,0,0,0,0,0", "5,1,1,1,1,1,1,1,1"], r"labels must lie in 0..3 \(or 1..4\), found 0..5"),
        (["-1,0,0,0,0,0,0,0,0", "2,1,1,1,1,1,1,1,1"], "labels must lie in"),
        (["1,0,0,0,0,0,0,0,0", "2,1,1,1,1,1,1,1"], "ragged rows"),
        (["1,0,0,0,0,0,0,0,yes"], "not a table of numbers"),
        ([], "no records"),
    ],
)
def test_corrupt_tables_are_refused(tmp_path, lines, message):
    path = tmp_path / "bad.csv"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ValueError, match=message):
        read_binary_table(path, num_features=8, num_classes=4)


def test_corrupt_npz_and_label_files_are_refused(tmp_path):
    np.savez(tmp_path / "a.npz", features=np.zeros((3, 8)))
    with pytest.raises(ValueError, match="lacks array"):
        read_binary_table(tmp_path / "a.npz", 8, 4)
    np.savez(tmp_path / "b.npz", features=np.zeros((3, 8)), labels=np.array([[1, 1, 0, 0]] * 3))
    with pytest.raises(ValueError, match="one-hot"):
        read_binary_table(tmp_path / "b.npz", 8, 4)
    feats = write_csv(tmp_path / "feats", np.zeros((3, 8), dtype=int))
    (tmp_path / "labels").write_text("1\n2\n")
    with pytest.raises(ValueError, match="3 feature rows but 2 labels"):
        read_binary_table(feats, 8, 4)
    with pytest.raises(ValueError, match="but labels_path was also given"):
        read_binary_table(write_csv(tmp_path / "lf.csv", np.zeros((3, 9), dtype=int)), 8, 4, tmp_path / "labels")


def test_missing_files_name_the_expected_path_format_and_source(tmp_path):
    dm = Purchase100DataModule(path=str(tmp_path / "nowhere" / "dataset_purchase"))
    with pytest.raises(FileNotFoundError, match=r"nowhere/dataset_purchase.*label-first CSV.*privacytrustlab"):
        dm.setup()
    assert dm._eval_dataset is None  # refused before any work
    feats = write_csv(tmp_path / "texas" / "feats", np.zeros((2, 6170), dtype=int))
    with pytest.raises(FileNotFoundError, match=r"features only .*texas/labels, one per line"):
        Texas100DataModule(path=str(feats)).setup()
    wrong = write_csv(tmp_path / "w.csv", np.zeros((2, 447 + 5), dtype=int))
    with pytest.raises(ValueError, match="has 452 fields in its first row"):
        LocationDataModule(path=str(wrong)).setup()


def test_cli_fit_without_the_data_file_exits_at_once_naming_the_path(tmp_path):
    config = REPO / "configs" / "paper" / "purchase100.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "mia_lightning", "fit", "--config", str(config), "--runs_dir", str(tmp_path / "runs"),
         "--trainer.logger", "false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert "FileNotFoundError" in proc.stderr and "data/purchase100/dataset_purchase" in proc.stderr
    assert not list((tmp_path / "runs").glob("*/config.yaml"))


# -- CIFAR in torchvision's on-disk format ---------------------------------------------------------------------
def write_cifar(root: Path, per_batch: int, cifar100: bool = False, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pickled batches as in the official python archives; returns (images NCHW uint8, labels) in pool order."""
    rng = np.random.default_rng(seed)
    num_classes = 100 if cifar100 else 10
    folder = root / ("cifar-100-python" if cifar100 else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    names = ["train", "test"] if cifar100 else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    sizes = [5 * per_batch, per_batch] if cifar100 else [per_batch] * 6
    images, labels = [], []
    for name, n in zip(names, sizes):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = list(rng.integers(0, num_classes, n))
        entry = {"data": data, "fine_labels": y, "coarse_labels": [v // 5 for v in y]} if cifar100 else \
            {"data": data, "labels": y}
        (folder / name).write_bytes(pickle.dumps(entry))
        images.append(data.reshape(n, 3, 32, 32))
        labels += y
    meta_name, key = ("meta", "fine_label_names") if cifar100 else ("batches.meta", "label_names")
    (folder / meta_name).write_bytes(pickle.dumps({key: [f"class{i}" for i in range(num_classes)]}))
    return np.concatenate(images), np.array(labels)


def test_cifar10_pools_train_then_test_and_normalises_the_eval_view(tmp_path):
    images, labels = write_cifar(tmp_path, per_batch=10)
    dm = CIFAR10DataModule(root=str(tmp_path), num_members=30, augment=True)
    dm.setup()
    pool = dm.eval_dataset
    assert len(pool) == 60 and dm.num_classes == 10 and dm.input_shape == (3, 32, 32)
    for i in (0, 49, 50, 59):  # 50 training images first, then the 10 test images
        x, y = pool[i]
        expected = (torch.from_numpy(images[i]).float() / 255 - torch.tensor(dm.mean)[:, None, None]) / torch.tensor(
            dm.std
        )[:, None, None]
        torch.testing.assert_close(x, expected)
        assert int(y) == labels[i]
    assert torch.equal(pool[3][0], pool[3][0])  # the eval view is deterministic
    train = dm.train_dataset
    assert train is not pool
    torch.manual_seed(0)
    views = torch.stack([train[3][0] for _ in range(8)])
    assert not all(torch.equal(v, views[0]) for v in views)  # augmentation on the training view
    assert views.shape == (8, 3, 32, 32)


def test_cifar_without_augmentation_shares_one_view_and_cifar100_reads_fine_labels(tmp_path):
    _, labels = write_cifar(tmp_path, per_batch=4, cifar100=True)
    dm = CIFAR100DataModule(root=str(tmp_path), num_members=10)
    dm.setup()
    assert dm.dataset_name == "cifar100" and dm.num_classes == 100
    assert dm.train_dataset is dm.eval_dataset and len(dm.eval_dataset) == 24
    assert [int(dm.eval_dataset[i][1]) for i in range(24)] == labels.tolist()


def test_cifar_missing_or_corrupt_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py.*data_batch_1, .*test_batch, batches.meta"):
        CIFAR10DataModule(root=str(tmp_path / "none")).setup()
    write_cifar(tmp_path, per_batch=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="missing data_batch_3"):
        CIFAR10DataModule(root=str(tmp_path)).setup()
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="does not hold readable CIFAR python batches"):
        CIFAR10DataModule(root=str(tmp_path)).setup()


def test_fit_the_quick_cifar_config_end_to_end(tmp_path):
    write_cifar(tmp_path / "data", per_batch=50)  # 300 images
    main([
        "fit", "--config", str(REPO / "configs" / "cifar10_quick.yaml"), "--runs_dir", str(tmp_path / "runs"),
        "--run_name", "quick", "--trainer.max_epochs", "2", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--model.arch_kwargs", '{"channels": [8, 16], "hidden": 16}',
        "--snapshots.epochs", "[1, 2]", "--audit.attacks", "[loss]", "--audit.per_epoch_attacks", "[]",
        "--audit.progress", "false",
        "--data.init_args.root", str(tmp_path / "data"), "--data.init_args.num_members", "150",
        "--data.init_args.num_nonmembers", "150", "--data.init_args.attack_train_members", "50",
        "--data.init_args.attack_train_nonmembers", "50", "--data.init_args.attack_test_members", "50",
        "--data.init_args.attack_test_nonmembers", "50",
    ])
    metrics = json.loads((tmp_path / "runs" / "quick" / "metrics.json").read_text())
    assert metrics["target"]["epochs"] == 2 and 0.0 <= metrics["target"]["test_acc"] <= 1.0
    assert metrics["attacks"]["loss"]["n_members"] == 50


# -- synthetic Purchase ----------------------------------------------------------------------------------------
def test_synthetic_purchase_is_seeded_binary_and_follows_its_prototypes():
    x, y = make_synthetic_purchase(20_000, seed=3)  # more than one generation chunk
    assert x.shape == (20_000, 600) and x.dtype == np.uint8 and set(np.unique(x)) == {0, 1}
    assert y.min() == 0 and y.max() == 99 and len(np.unique(y)) == 100
    x2, y2 = make_synthetic_purchase(20_000, seed=3)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(make_synthetic_purchase(100, seed=4)[0], x[:100])
    prototypes = class_prototypes(np.random.default_rng(3))
    for c in (0, 57):  # each record is a Bernoulli draw from its class's prototype
        means = x[y == c].mean(axis=0)
        assert np.abs(means - prototypes[c]).max() < 0.2
        assert np.abs(means - prototypes[c]).mean() < 0.02
    assert 0.02 < x.mean() < 0.06  # sparse, as purchase histories are


def test_synthetic_classes_overlap_but_are_learnable():
    """Bayes-optimal accuracy (the generator is naive Bayes) sits well below 100% but far above chance."""
    x, y = make_synthetic_purchase(5_000, seed=0)
    p = class_prototypes(np.random.default_rng(0))
    scores = x @ np.log(p).T + (1 - x) @ np.log1p(-p).T
    assert 0.9 < (scores.argmax(axis=1) == y).mean() < 0.995
    signature = (p > p.min()).astype(int)
    shared = signature @ signature.T
    np.fill_diagonal(shared, 0)
    assert shared.max(axis=1).min() >= 3  # every class shares signature features with a neighbour


def test_synthetic_datamodule_says_it_is_synthetic(caplog):
    dm = SyntheticPurchaseDataModule(num_records=300, data_seed=1, num_members=100)
    lightning_logger = logging.getLogger("lightning.pytorch")  # may not propagate to the root logger
    lightning_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            dm.setup()
    finally:
        lightning_logger.removeHandler(caplog.handler)
    assert dm.dataset_name == "synthetic_purchase" and dm.input_shape == (600,) and dm.num_classes == 100
    assert "SYNTHETIC" in caplog.text
    assert len(dm.eval_dataset) == 300 and len(dm.split.members) == 100
    with pytest.raises(ValueError, match="num_records must be >= 4"):
        SyntheticPurchaseDataModule(num_records=3)


# -- configs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", FIT_CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_fit_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["class_path"] and printed["model"]["arch"]


PAPER_POOLS = {"purchase100": 197_324, "texas100": 67_330, "location": 5_010, "cifar100_alexnet": 60_000,
               "cifar100_densenet": 60_000, "cifar100_resnet": 60_000}


@pytest.mark.parametrize("name", sorted(PAPER_POOLS))
def test_paper_config_sizes_fit_the_real_dataset(name):
    data = yaml.safe_load((REPO / "configs" / "paper" / f"{name}.yaml").read_text())["data"]["init_args"]
    keys = ("num_members", "num_nonmembers", "attack_train_members", "attack_train_nonmembers",
            "attack_test_members", "attack_test_nonmembers")
    split = MembershipSplit.draw(name, PAPER_POOLS[name], 0, **{k: data[k] for k in keys})
    assert split.sizes()["attack_test_nonmembers"] >= 1000  # enough for TPR at 0.1% FPR
