"""Purchase100, Texas100 and Location: the binary-feature tabular sets of the membership-inference literature.

Where to get them: the processed releases of Shokri et al. (S&P 2017), which Nasr et al. use, are in
https://github.com/privacytrustlab/datasets (``dataset_purchase.tgz``, ``dataset_texas.tgz``,
``dataset_location.tgz``). Unpack them so that the default paths (relative to the working directory) exist::

    data/purchase100/dataset_purchase      label-first CSV, 197,324 rows, labels 1..100
    data/texas100/feats                    features-only CSV, 67,330 rows (from the archive's texas/100/)
    data/texas100/labels                   one label per line, 1..100
    data/location/bangkok                  label-first CSV, 5,010 rows, labels 1..30

or pass ``path`` (and ``labels_path``) to point elsewhere. Formats read, one record per row, features 0/1:

* label-first CSV ``label,f1,...,fD`` (a quoted label such as ``"7"`` is fine);
* features-only CSV ``f1,...,fD`` with a labels file of one integer per line (Texas100's two-file form); the labels
  file is ``labels_path``, or ``labels`` beside the features file when not given;
* ``.npz`` with arrays ``features`` (N, D) and ``labels`` (N,) or one-hot (N, C).

A CSV's form is told by its row width: D + 1 fields is label-first, D fields is features-only.
Labels: the original releases number classes 1..C. Labels whose smallest value is 1 and largest is C are mapped to
0..C-1 (a renaming of the classes, nothing else changes); labels already in 0..C-1 are kept; anything else is refused.
Parsing is numpy's C ``loadtxt`` into int16 (about 2 s of CPU time for a 197,324 x 601 Purchase100-sized file), with a
float fallback for files that write ``1.0``; no cache is written beside the data.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from datamodules.base import ArrayMembershipDataModule

SOURCE = "https://github.com/privacytrustlab/datasets"


def _parse_csv(path: Path) -> np.ndarray:
    """A rectangular comma-separated table of numbers: int16 when every field is an integer, else float32."""
    last_error: ValueError | None = None
    for dtype in (np.int16, np.float32):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="loadtxt: input contained no data")
                return np.loadtxt(path, delimiter=",", dtype=dtype, quotechar='"', ndmin=2)
        except ValueError as err:
            if "number of columns changed" in str(err):
                detail = str(err).split(";")[0]
                raise ValueError(f"{path}: ragged rows; every row needs the same number of fields ({detail})") from None
            last_error = err
    raise ValueError(f"{path}: not a table of numbers ({last_error})") from None


def _as_integers(values: np.ndarray, what: str, path: Path) -> np.ndarray:
    if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
        raise ValueError(f"{path}: {what} must be integers")
    return values.astype(np.int64)


def _labels_from_one_hot(labels: np.ndarray, path: Path) -> np.ndarray:
    if not (np.isin(labels, (0, 1)).all() and (labels.sum(axis=1) == 1).all()):
        raise ValueError(f"{path}: 2-d 'labels' must be one-hot (exactly one 1 per row)")
    return labels.argmax(axis=1)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("features", "labels") if k not in z.files]
            if missing:
                raise ValueError(f"{path}: .npz lacks array(s) {', '.join(missing)} (has {', '.join(z.files)})")
            features, labels = z["features"], z["labels"]
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npz ({err})") from None
    if features.ndim != 2:
        raise ValueError(f"{path}: 'features' must be 2-d (records, features), got shape {features.shape}")
    if labels.ndim == 2:
        labels = _labels_from_one_hot(labels, path)
    elif labels.ndim != 1:
        raise ValueError(f"{path}: 'labels' must be 1-d or one-hot 2-d, got shape {labels.shape}")
    return features, labels


def _is_binary(values: np.ndarray) -> bool:
    if values.dtype.kind in "iub":  # min/max: no full-size temporaries for a 400M-entry Texas table
        return values.size == 0 or (int(values.min()) >= 0 and int(values.max()) <= 1)
    return bool(np.isin(values, (0, 1)).all())


def _show(path: Path) -> str:
    """A path as given, plus where it resolves to when relative (default paths are relative to the working dir)."""
    return str(path) if path.is_absolute() else f"{path} ({path.resolve()})"


def _first_row_width(path: Path) -> int:
    with open(path, "rb") as f:
        line = f.readline()
    if not line.strip():
        raise ValueError(f"{path}: the first line is empty; expected comma-separated numbers")
    return line.count(b",") + 1


def zero_based_labels(labels: np.ndarray, num_classes: int, path: Path) -> np.ndarray:
    """Map the releases' 1..C labels to 0..C-1; keep 0..C-1; refuse anything else."""
    low, high = int(labels.min()), int(labels.max())
    if low == 1 and high == num_classes:
        rank_zero_info(f"{path.name}: labels 1..{num_classes} mapped to 0..{num_classes - 1}")
        return labels - 1
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"{path}: labels must lie in 0..{num_classes - 1} (or 1..{num_classes}), found {low}..{high}"
        )
    return labels


def read_binary_table(
    path: str | Path, num_features: int, num_classes: int, labels_path: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(features uint8 (N, num_features) in {0, 1}, labels int64 (N,) in [0, num_classes))``.

    ``path`` is a label-first CSV, a features-only CSV (labels from ``labels_path`` or a sibling ``labels`` file)
    or a ``.npz``; see the module docstring. Anything that does not fit is refused with the file named.
    """
    path = Path(path)
    if path.suffix == ".npz":
        if labels_path is not None:
            raise ValueError(f"{path}: a .npz holds its own labels; do not pass labels_path")
        features, labels = _read_npz(path)
    else:
        table = _parse_csv(path)
        if table.size == 0:
            raise ValueError(f"{path}: no records")
        if table.shape[1] == num_features + 1:
            if labels_path is not None:
                raise ValueError(
                    f"{path}: rows have a label column ({num_features + 1} fields) but labels_path was also given"
                )
            features, labels = table[:, 1:], table[:, 0]
        elif table.shape[1] == num_features:
            labels_file = Path(labels_path) if labels_path is not None else path.with_name("labels")
            label_table = _parse_csv(labels_file)
            if label_table.shape[1] != 1:
                raise ValueError(f"{labels_file}: expected one label per line, got {label_table.shape[1]} fields")
            features, labels = table, label_table[:, 0]
        else:
            raise ValueError(
                f"{path}: rows have {table.shape[1]} fields; expected {num_features + 1} (label, then "
                f"{num_features} features) or {num_features} (features only, labels in a separate file)"
            )
    if features.shape[1] != num_features:
        raise ValueError(f"{path}: expected {num_features} features per record, found {features.shape[1]}")
    if len(features) != len(labels):
        raise ValueError(f"{path}: {len(features)} feature rows but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError(f"{path}: no records")
    if not _is_binary(features):
        bad = np.argwhere((features != 0) & (features != 1))[0]
        raise ValueError(
            f"{path}: features must be binary (0 or 1); record {bad[0]}, feature {bad[1]} is {features[tuple(bad)]}"
        )
    labels = zero_based_labels(_as_integers(labels, "labels", path), num_classes, path)
    return features.astype(np.uint8), labels


class BinaryTabularDataModule(ArrayMembershipDataModule):
    """A binary-feature dataset read from a file (see the module docstring for formats and sources).

    Args:
        path: the data file; relative paths are resolved against the working directory.
        labels_path: the labels file for a features-only CSV (default: ``labels`` beside ``path``).
    """

    title: str
    num_features: int
    num_labels: int
    archive: str

    def __init__(self, path: str, labels_path: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.path = path
        self.labels_path = labels_path

    @property
    def num_classes(self) -> int:
        return self.num_labels

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.num_features,)

    def _expected(self) -> str:
        return (
            f"a label-first CSV (label,f1,...,f{self.num_features}; {self.num_features} binary features, labels "
            f"1..{self.num_labels} or 0..{self.num_labels - 1}), a features-only CSV with a labels file, or a .npz "
            f"with 'features' and 'labels'. Get it from {SOURCE} ({self.archive}), or set data.init_args.path"
        )

    def check_available(self) -> None:
        """Refuse missing files (naming the expected path, format and source) before any work."""
        path = Path(self.path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.title} data not found at {_show(path)}; expected {self._expected()}"
            )
        if path.suffix == ".npz":
            return
        width = _first_row_width(path)
        if width == self.num_features:
            labels = Path(self.labels_path) if self.labels_path is not None else path.with_name("labels")
            if not labels.is_file():
                raise FileNotFoundError(
                    f"{self.title}: {path} holds features only ({width} fields per row), so its labels are expected "
                    f"in {_show(labels)}, one per line; get it from {SOURCE} ({self.archive}) or set "
                    "data.init_args.labels_path"
                )
        elif width != self.num_features + 1:
            raise ValueError(
                f"{self.title}: {path} has {width} fields in its first row; expected {self.num_features + 1} (label "
                f"first) or {self.num_features} (features only)"
            )

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return read_binary_table(self.path, self.num_features, self.num_labels, self.labels_path)


class Purchase100DataModule(BinaryTabularDataModule):
    """Purchase100: 197,324 shoppers, 600 binary "bought product j" features, 100 clusters as classes."""

    dataset_name = "purchase100"
    title = "Purchase100"
    num_features = 600
    num_labels = 100
    archive = "dataset_purchase.tgz"

    def __init__(self, path: str = "data/purchase100/dataset_purchase", labels_path: str | None = None, **kwargs):
        super().__init__(path=path, labels_path=labels_path, **kwargs)


class Texas100DataModule(BinaryTabularDataModule):
    """Texas100: 67,330 hospital discharges, 6,170 binary features, the 100 most frequent procedures as classes."""

    dataset_name = "texas100"
    title = "Texas100"
    num_features = 6170
    num_labels = 100
    archive = "dataset_texas.tgz, files texas/100/feats and texas/100/labels"

    def __init__(self, path: str = "data/texas100/feats", labels_path: str | None = None, **kwargs):
        super().__init__(path=path, labels_path=labels_path, **kwargs)


class LocationDataModule(BinaryTabularDataModule):
    """Location (Foursquare check-ins in Bangkok): 5,010 users, 446 binary region/type features, 30 classes."""

    dataset_name = "location"
    title = "Location"
    num_features = 446
    num_labels = 30
    archive = "dataset_location.tgz"

    def __init__(self, path: str = "data/location/bangkok", labels_path: str | None = None, **kwargs):
        super().__init__(path=path, labels_path=labels_path, **kwargs)
