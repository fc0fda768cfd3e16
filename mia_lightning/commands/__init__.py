"""Orchestration commands beside LightningCLI's ``fit``: ``attack``, ``compare``, ``federated``."""
