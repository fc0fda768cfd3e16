"""Lightning callbacks: the end-of-fit membership audit and parameter snapshots across epochs."""

from callbacks.audit import MembershipAudit
from callbacks.snapshot import ParameterSnapshot

__all__ = ["MembershipAudit", "ParameterSnapshot"]
