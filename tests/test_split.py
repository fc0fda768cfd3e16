import numpy as np
import pytest

from datamodules import DigitsDataModule
from datamodules.base import PARTS, MembershipSplit


def draw(**kw):
    args = dict(dataset_name="d", dataset_size=1000, seed=3, num_members=400)
    args.update(kw)
    return MembershipSplit.draw(**args)


def test_split_is_disjoint_balanced_and_inside_its_pools():
    s = draw()
    assert len(s.members) == 400 and len(s.nonmembers) == 600
    assert not np.intersect1d(s.members, s.nonmembers).size
    assert len(s.attack_train_members) == len(s.attack_train_nonmembers) == 200
    assert len(s.attack_test_members) == len(s.attack_test_nonmembers) == 200
    assert set(s.attack_train_members) | set(s.attack_test_members) <= set(s.members)
    assert set(s.attack_train_nonmembers) | set(s.attack_test_nonmembers) <= set(s.nonmembers)
    assert not np.intersect1d(s.attack_train_members, s.attack_test_members).size
    assert not np.intersect1d(s.attack_train_nonmembers, s.attack_test_nonmembers).size


def test_split_sizes_as_counts_or_fractions():
    s = draw(num_members=0.25, num_nonmembers=0.5, attack_train_members=0.5, attack_test_members=50,
             attack_train_nonmembers=100, attack_test_nonmembers=0.1)
    assert s.sizes() == {"members": 250, "nonmembers": 500, "attack_train_members": 125,
                         "attack_train_nonmembers": 100, "attack_test_members": 50, "attack_test_nonmembers": 50}


def test_integral_floats_above_one_are_counts():
    assert draw(num_members=400.0, attack_test_members=50.0).sizes()["attack_test_members"] == 50
    with pytest.raises(ValueError, match="fraction must be in"):
        draw(num_members=2.5)


def test_split_is_reproducible_from_seed_and_changes_with_it():
    a, b, c = draw(), draw(), draw(seed=4)
    for part in PARTS:
        np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
    assert not np.array_equal(a.members, c.members)


def test_split_round_trips_through_file(tmp_path):
    s = draw()
    s.save(tmp_path / "split.npz")
    t = MembershipSplit.load(tmp_path / "split.npz")
    assert (t.dataset_name, t.dataset_size, t.seed) == ("d", 1000, 3)
    for part in PARTS:
        np.testing.assert_array_equal(getattr(s, part), getattr(t, part))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(num_members=900, num_nonmembers=200), "exceed the dataset"),
        (dict(attack_train_members=300, attack_test_members=200), "exceed the 400 members"),
        (dict(num_members=1.5), "fraction must be in"),
        (dict(num_members=-1), "must be >= 0"),
    ],
)
def test_impossible_split_sizes_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        draw(**kw)


def test_overlapping_split_file_is_refused(tmp_path):
    s = draw()
    bad = dict(np.load(_saved(s, tmp_path)))
    bad["nonmembers"] = np.concatenate([bad["nonmembers"][:-1], bad["members"][:1]])
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(ValueError, match="overlap"):
        MembershipSplit.load(tmp_path / "bad.npz")


def test_corrupt_split_file_is_refused(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        MembershipSplit.load(tmp_path / "bad.npz")


def _saved(split, tmp_path):
    split.save(tmp_path / "s.npz")
    return tmp_path / "s.npz"


def test_datamodule_saves_then_reuses_its_split(tmp_path):
    path = tmp_path / "split.npz"
    dm = DigitsDataModule(num_members=500, seed=1, split_file=str(path))
    dm.setup()
    first = dm.split
    assert path.exists() and len(first.members) == 500 and first.dataset_size == 1797
    dm2 = DigitsDataModule(num_members=500, seed=99, split_file=str(path))  # another seed: the file wins
    dm2.setup()
    np.testing.assert_array_equal(dm2.split.members, first.members)


def test_datamodule_refuses_split_of_another_dataset_or_size(tmp_path):
    path = tmp_path / "split.npz"
    draw(dataset_name="purchase100").save(path)
    with pytest.raises(ValueError, match="drawn for dataset 'purchase100'"):
        DigitsDataModule(num_members=500, split_file=str(path)).setup()
    MembershipSplit.draw("digits", 1797, 0, num_members=300).save(path)
    with pytest.raises(ValueError, match="config asks for"):
        DigitsDataModule(num_members=500, split_file=str(path)).setup()


def test_digits_views_and_loaders():
    dm = DigitsDataModule(num_members=100, as_images=True, batch_size=16)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 8, 8) and y.dtype.is_floating_point is False
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert sum(len(b[1]) for b in dm.val_dataloader()) == 1797 - 100


def test_stratified_split_keeps_every_part_in_the_class_proportions():
    labels = np.repeat(np.arange(10), [50, 60, 70, 80, 90, 100, 110, 120, 130, 190])
    s = draw(labels=labels, num_members=250, attack_test_nonmembers=500)
    assert s.stratified
    share = np.bincount(labels, minlength=10) / len(labels)

    def within_one_record(idx, pool):  # largest-remainder quotas: each class within one record of its pool's share
        pool_share = np.bincount(labels[pool], minlength=10) / len(pool)
        return np.all(np.abs(np.bincount(labels[idx], minlength=10) - pool_share * len(idx)) < 1.0)

    everything = np.arange(len(labels))
    assert within_one_record(s.members, everything) and within_one_record(s.nonmembers, everything)
    for part in ("attack_train_members", "attack_test_members"):
        assert within_one_record(getattr(s, part), s.members), part
    assert within_one_record(s.attack_train_nonmembers, s.nonmembers)
    assert set(s.attack_train_members) | set(s.attack_test_members) <= set(s.members)
    assert not np.intersect1d(s.attack_train_nonmembers, s.attack_test_nonmembers).size
    unstratified = draw(num_members=250, attack_test_nonmembers=500)
    assert not unstratified.stratified
    assert np.abs(np.bincount(labels[unstratified.members], minlength=10) - share * 250).max() >= 1.0


def test_stratification_is_reproducible_and_survives_the_file(tmp_path):
    labels = np.arange(1000) % 7
    a, b = draw(labels=labels), draw(labels=labels)
    for part in PARTS:
        np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
    a.save(tmp_path / "split.npz")
    assert MembershipSplit.load(tmp_path / "split.npz").stratified


def test_labels_must_match_the_dataset():
    with pytest.raises(ValueError, match="one entry per record"):
        draw(labels=np.zeros(999, dtype=np.int64))


def test_datamodule_stratifies_by_default_and_refuses_a_split_file_drawn_otherwise(tmp_path):
    path = tmp_path / "split.npz"
    DigitsDataModule(num_members=250, split_file=str(path), stratify=False).prepare_split()
    with pytest.raises(ValueError, match="stratify=False but the config asks for stratify=True"):
        DigitsDataModule(num_members=250, split_file=str(path)).prepare_split()
    dm = DigitsDataModule(num_members=250)
    split = dm.prepare_split()
    labels = dm.record_labels()
    assert split.stratified
    share = np.bincount(labels) / len(labels)
    assert np.all(np.abs(np.bincount(labels[split.members], minlength=10) - 250 * share) < 1.0)
