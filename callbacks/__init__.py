"""Lightning callbacks: the end-of-fit membership audit and parameter snapshots across epochs."""

from callbacks.audit import MembershipAudit

__all__ = ["MembershipAudit"]
