"""LightningDataModules that own the membership split (members, non-members, the attacker's sets)."""

from datamodules.base import ArrayMembershipDataModule, MembershipDataModule, MembershipSplit
from datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from datamodules.digits import DigitsDataModule
from datamodules.synthetic import SyntheticPurchaseDataModule
from datamodules.tabular import LocationDataModule, Purchase100DataModule, Texas100DataModule

__all__ = [
    "ArrayMembershipDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "LocationDataModule",
    "MembershipDataModule",
    "MembershipSplit",
    "Purchase100DataModule",
    "SyntheticPurchaseDataModule",
    "Texas100DataModule",
]
