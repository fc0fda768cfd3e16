"""The supervised attack of Nasr et al. (2019), trained on the attacker's known members and non-members.

One network serves three registered attacks: ``whitebox`` (final model: prediction, loss, label and the last
layer's gradient), ``whitebox_multi_epoch`` (the same features at every snapshot, stacked) and ``blackbox_nn``
(``BlackboxAttack``: what a black-box attacker computes from the prediction vector and the label it knows,
including the loss, as in the authors' ML Privacy Meter), so their differences are the features alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mia_lightning.attacks.base import balanced_threshold, check_feature_set, check_known_sets
from mia_lightning.attacks.network import AttackNetwork
from mia_lightning.attacks.neural import NetworkAttack
from mia_lightning.attacks.training import (
    EVALUATION_CHUNK,
    Batch,
    BestEpochModule,
    RecordBatches,
    StratifiedBatchSampler,
    chunks,
    held_out_split,
    seeded,
)
from mia_lightning.features import LOG_OUTPUT, PREDICTIONS, FeatureSet
from mia_lightning.metrics import roc_auc


class WhiteboxAttackModule(BestEpochModule):
    """Trains an AttackNetwork with the paper's objective: (h - 1)^2 on members, h^2 on non-members,
    h = sigmoid(output). Keeps the epoch with the best validation AUC.
    """

    def __init__(self, network: AttackNetwork, lr: float) -> None:
        super().__init__(maximize=True)
        self.network = network
        self.lr = lr
        self._validation: list[tuple[Tensor, Tensor]] = []

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.network(features)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        features, is_member = batch
        loss = ((torch.sigmoid(self(features)) - is_member) ** 2).mean()
        self.log("train_loss", loss, prog_bar=True, batch_size=len(is_member))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        features, is_member = batch
        self._validation.append((self(features).detach().cpu(), is_member.cpu()))

    def on_validation_epoch_end(self) -> None:
        scores, labels = (torch.cat(parts).double().numpy() for parts in zip(*self._validation))
        self._validation.clear()
        auc = roc_auc(scores, labels)
        self.log("val_auc", auc, prog_bar=True)
        self.keep_if_best(auc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class WhiteboxAttack(NetworkAttack):
    """The paper's supervised attack model; see ``NetworkAttack`` for the arguments.

    ``score`` returns the network's pre-sigmoid output (sigmoid of it = Pr(member)), at ``resolution_``: same
    ranking as the probability, without float32 saturation at 0 and 1. After ``fit``: ``best_epoch_`` and
    ``validation_auc_`` (on the held-out slice of the known sets) and ``threshold_`` (chosen on that slice).
    """

    default_name = "whitebox"

    def fit(self, train_members: FeatureSet, train_nonmembers: FeatureSet) -> WhiteboxAttack:
        members, nonmembers = check_known_sets(train_members, train_nonmembers)
        inputs = self._check_same_inputs(members, nonmembers)
        names = [name for spec in inputs for name in spec.names]
        records = RecordBatches(
            [self._select(members, names), self._select(nonmembers, names)],
            torch.cat([torch.ones(len(members)), torch.zeros(len(nonmembers))]),
        )
        groups = [torch.arange(len(members)), torch.arange(len(members), len(records))]
        train_groups, validation_groups = held_out_split(groups, self.validation_fraction, self.seed)
        validation = torch.cat(validation_groups)
        with seeded(self.seed):
            network = AttackNetwork(inputs, **self.network_args)
            network.fit_input_scaling(records[batch][0] for batch in chunks(torch.cat(train_groups), EVALUATION_CHUNK))
            module = WhiteboxAttackModule(network, self.lr)
            sampler = StratifiedBatchSampler(train_groups, self.batch_size, self.seed)
            self._train(module, records, sampler, validation)
        self.inputs_, self.network_ = inputs, network
        self.best_epoch_, self.validation_auc_ = module.best_epoch, module.best_value
        known_scores = self._fit_resolution(self._network_outputs(network, records, torch.arange(len(records))))
        self.threshold_ = balanced_threshold(known_scores[validation], records.targets[validation].numpy())
        return self

    def score(self, features: FeatureSet) -> np.ndarray:
        selected = self._fitted_inputs(check_feature_set(features, "features"))
        records = RecordBatches([selected], torch.zeros(len(features)))
        return self._at_resolution(self._network_outputs(self.network_, records, torch.arange(len(features))))


class BlackboxAttack(WhiteboxAttack):
    """The attack network on black-box features only: the prediction vector (``outputs``: ``"log_output"``, or
    the paper's softmax ``"output"``), the label and the loss, which the attacker computes from those two.

    Without the loss the network must learn ``-log p_y`` (for a correct prediction: the largest log-probability
    among the other classes) from a few hundred records; on the digits audit it then stayed ~0.07 AUC below the
    loss threshold it is meant to beat. The loss adds no information, only makes that function one input away.
    """

    default_name = "blackbox_nn"

    def __init__(self, outputs: Sequence[str] = (LOG_OUTPUT,), **kwargs) -> None:
        if isinstance(outputs, str) or not outputs or not set(outputs) <= set(PREDICTIONS):
            raise ValueError(
                f"a black-box attack reads only the prediction vector: outputs must be among {list(PREDICTIONS)}, "
                f"got {outputs!r}"
            )
        super().__init__(outputs=outputs, **kwargs)
