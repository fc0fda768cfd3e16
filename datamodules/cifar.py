"""CIFAR-10 and CIFAR-100 through torchvision, train and test sets pooled into one 60,000-record dataset.

The membership split decides who is a member, so torchvision's train/test division is not kept: the pool is the
50,000 training images followed by the 10,000 test images, in that fixed order.

Folder layout under ``root`` (torchvision's, as unpacked from the official python archives at
https://www.cs.toronto.edu/~kriz/cifar.html, or fetched with ``download: true``)::

    root/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta
    root/cifar-100-python/train, test, meta

Integrity: torchvision checks every file's md5 before reading it. The readers here check presence only, so that
other copies of the files, and the small sets the tests generate in the same format, load too; a download itself is
still md5-checked by torchvision (archive checksum). The files are Python pickles: point ``root`` at files you trust.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.transforms import v2

from datamodules.base import MembershipDataModule


class PresenceCheckedCIFAR10(CIFAR10):
    """torchvision's reader with its md5 checks turned into presence checks (``md5=None`` means "file exists")."""

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class PresenceCheckedCIFAR100(CIFAR100):
    """torchvision's CIFAR-100 reader with presence checks instead of md5 checks."""

    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


class ImagePool(Dataset):
    """uint8 images (N, 3, H, W) with labels; ``transform`` turns one uint8 image into the model's float input."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Callable[[Tensor], Tensor]) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.transform(self.images[index]), self.labels[index]


class CIFAR10DataModule(MembershipDataModule):
    """CIFAR-10 as one pool of 60,000 32x32 colour images, 10 classes.

    Args:
        root: the folder holding ``cifar-10-batches-py/`` (see the module docstring for the layout).
        download: fetch the archive into ``root`` first when the files are missing.
        augment: random crop (padding 4) + horizontal flip on the training view only; attacks and accuracy use the
            un-augmented evaluation view.
    """

    dataset_name = "cifar10"
    num_labels = 10
    reader: type[CIFAR10] = PresenceCheckedCIFAR10
    # The usual per-channel statistics of the training images.
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def __init__(self, root: str = "data", download: bool = False, augment: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.download = download
        self.augment = augment
        self._pool: tuple[Tensor, Tensor] | None = None

    @property
    def num_classes(self) -> int:
        return self.num_labels

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, 32, 32)

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.reader.base_folder

    def files(self) -> list[str]:
        return [n for n, _ in self.reader.train_list + self.reader.test_list] + [self.reader.meta["filename"]]

    def check_available(self) -> None:
        """Download when asked; then refuse a missing folder or file, naming the layout torchvision expects."""
        if self.download:
            self.reader(self.root, train=True, download=True)
        missing = [n for n in self.files() if not (self.folder / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{self.dataset_name}: missing {', '.join(missing)} in {self.folder.resolve()}; "
                f"expected torchvision's layout {self.folder}/{{{', '.join(self.files())}}}, unpacked from the python "
                "version at https://www.cs.toronto.edu/~kriz/cifar.html, or set data.init_args.download true"
            )

    def _load_pool(self) -> tuple[Tensor, Tensor]:
        if self._pool is None:
            images, labels = [], []
            for train in (True, False):
                try:
                    part = self.reader(self.root, train=train, download=False)
                except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
                    raise ValueError(
                        f"{self.dataset_name}: {self.folder} does not hold readable CIFAR python batches ({err})"
                    ) from err
                images.append(part.data)
                labels.extend(part.targets)
            x = torch.from_numpy(np.ascontiguousarray(np.concatenate(images).transpose(0, 3, 1, 2)))
            y = torch.as_tensor(labels, dtype=torch.int64)
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(
                    f"{self.dataset_name}: labels must lie in [0, {self.num_classes}), got [{y.min()}, {y.max()}]"
                )
            self._pool = (x, y)
        return self._pool

    def image_transform(self, train: bool) -> Callable[[Tensor], Tensor]:
        steps = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if train and self.augment else []
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        return v2.Compose(steps)

    def record_labels(self) -> np.ndarray:
        return self._load_pool()[1].numpy()

    def load_dataset(self, train: bool) -> Dataset:
        if self._eval_dataset is not None and not (train and self.augment):
            return self._eval_dataset
        images, labels = self._load_pool()
        return ImagePool(images, labels, self.image_transform(train))


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels) as one pool of 60,000 32x32 colour images, 100 classes. Args as CIFAR-10's."""

    dataset_name = "cifar100"
    num_labels = 100
    reader = PresenceCheckedCIFAR100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
