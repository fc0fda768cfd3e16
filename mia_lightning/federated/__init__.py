"""Federated learning (FedAvg) under passive and active membership inference, as in Nasr et al. (2019), Table X.

- ``fedavg``: the federation: participants' Lightning local training, aggregation, where tampering acts.
- ``adversary``: the attacker settings, gradient ascent and isolation.
- ``layout``: the participants' shares and each attacker's known and target records.
- ``experiment``: one run: check everything, train the federations, attack them.
- ``results``: metrics.json, plots, report.md and W&B.
"""

from mia_lightning.federated.adversary import SETTINGS, ActiveAttacker, AttackSetting, gradient_ascent_step
from mia_lightning.federated.experiment import AttackerConfig, FederatedExperiment, FederationConfig
from mia_lightning.federated.fedavg import (
    Participant,
    ParticipantData,
    Tampering,
    average_states,
    local_update,
    run_fedavg,
)
from mia_lightning.federated.layout import AttackerRecords, AttackerSizes, FederatedLayout

__all__ = [
    "SETTINGS",
    "ActiveAttacker",
    "AttackSetting",
    "AttackerConfig",
    "AttackerRecords",
    "AttackerSizes",
    "FederatedExperiment",
    "FederatedLayout",
    "FederationConfig",
    "Participant",
    "ParticipantData",
    "Tampering",
    "average_states",
    "gradient_ascent_step",
    "local_update",
    "run_fedavg",
]
