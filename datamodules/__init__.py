"""LightningDataModules that own the membership split (members, non-members, the attacker's sets)."""

from datamodules.base import ArrayMembershipDataModule, MembershipDataModule, MembershipSplit
from datamodules.digits import DigitsDataModule

__all__ = ["ArrayMembershipDataModule", "DigitsDataModule", "MembershipDataModule", "MembershipSplit"]
