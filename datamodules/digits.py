"""scikit-learn's bundled handwritten digits: 1,797 8x8 images, 10 classes, no download. The embedded default."""

from __future__ import annotations

import numpy as np

from datamodules.base import ArrayMembershipDataModule


class DigitsDataModule(ArrayMembershipDataModule):
    """Digits scaled to [0, 1], as flat 64-vectors (``as_images=False``) or 1x8x8 images."""

    dataset_name = "digits"

    def __init__(self, as_images: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.as_images = as_images

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (1, 8, 8) if self.as_images else (64,)

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        data = load_digits()
        return data.data.astype(np.float32) / 16.0, data.target.astype(np.int64)
