"""The unsupervised attack of Nasr et al. (2019): no membership labels, only same-distribution records.

Design (PAPER.md leaves the bottleneck open; this is the faithful reading that works):
1. The encoder is the white-box attack network itself (same components, FC 256 -> 128 -> 64 -> 1); its scalar
   pre-sigmoid output is the record's embedding. A decoder FC 64 -> 5 reconstructs, from that scalar alone, five
   simple membership signals of the record, each on a log scale and standardised over the attacker's pool: the
   loss, whether the prediction is correct, the confidence on the true label (as a logit), the prediction
   entropy / log C, and the norm of the attacked layers' gradient (``membership_signals``). (The paper's table
   gives the decoder 4 outputs for these 5 signals; we reconstruct all 5.) A one-number bottleneck forces the
   embedding to be the main axis along which these signals vary together, which for a model that overfits is
   membership.
2. The encoder trains on the attacker's pool (``fit``'s two sets, labels discarded) for reconstruction error,
   keeping the epoch with the lowest error on a held-out 20% of the pool. With the paper's N(0, 0.01) init
   the encoder collapsed to a constant (every digits record embedded to -0.00139 +- 1e-8) and the decoder
   learned the signals' means; PyTorch's init, standardised inputs and log-scaled signals give an embedding
   that ranks records like the loss does (see ``network.INIT_STD``).
3. Spectral clustering splits scalar embeddings into two clusters on a nearest-neighbour graph (memory linear
   in the number of records); the cluster with the larger mean gradient norm is "non-member".
   ``predict`` does this on the target records it is given, as the paper does: the hard assignment of the
   records passed TOGETHER. ``score`` is the embedding with its sign fixed at ``fit`` by clustering the
   attacker's pool the same way, so that the member cluster scores higher (kept as is on a tie): pool and
   target records come from one distribution, and the score of a record does not depend on which other
   records are scored with it (members and non-members may be scored in separate calls).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import SpectralClustering
from torch import Tensor, nn

from mia_lightning.attacks.base import check_feature_set, check_known_sets, check_positive_int
from mia_lightning.attacks.network import AttackNetwork, fc_stack, init_weights
from mia_lightning.attacks.neural import NetworkAttack
from mia_lightning.attacks.threshold import LOG_PREDICTION, confidence_logit, prediction_entropy
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
from mia_lightning.features import LOG_OUTPUT, FeatureSet

SIGNALS = ("loss", "correct", "confidence", "entropy", "gradient_norm")
MIN_CLUSTERED_RECORDS = 4  # a two-way split of fewer records says nothing


def membership_signals(features: FeatureSet, gradient_layers: Sequence[str]) -> Tensor:
    """The five SIGNALS of each record at the last snapshot, float64 (N, 5), on log scales.

    Loss, entropy and gradient norm are logged and the confidence is the logit of p_y: members and most
    non-members alike are predicted confidently, so on linear scales these signals pile up at 0 (or 1) and
    their membership-relevant differences are orders of magnitude, invisible next to a misclassified record.
    The gradient norm is that of all ``gradient_layers`` together (root of the summed squared norms).
    """
    missing = [name for name in ("loss", LOG_PREDICTION, "target") if name not in features]
    if missing:
        raise ValueError(f"the membership signals need features {missing}; the FeatureSet has {list(features.names)}")
    log_probs, targets = features[LOG_PREDICTION][:, -1], features["target"]
    squared_norms = sum(features.gradient_norm(layer)[:, -1].double() ** 2 for layer in gradient_layers)
    return torch.stack(
        [
            _log(features["loss"][:, -1, 0].double()),
            (log_probs.argmax(dim=1) == targets).double(),
            confidence_logit(log_probs, targets),
            _log(prediction_entropy(log_probs) / math.log(log_probs.shape[1])),
            0.5 * _log(squared_norms),
        ],
        dim=1,
    )


def _log(values: Tensor) -> Tensor:
    """log, with exact zeros (a loss below float32's range) at the smallest positive float64 instead of -inf."""
    return torch.log(values.clamp_min(torch.finfo(torch.float64).tiny))


class ReconstructionModule(BestEpochModule):
    """Encoder (scalar embedding) + decoder trained to reconstruct the standardised signals (mean squared error).

    Keeps the epoch with the lowest validation error.
    """

    def __init__(self, encoder: AttackNetwork, decoder: nn.Module, lr: float) -> None:
        super().__init__(maximize=False)
        self.encoder, self.decoder, self.lr = encoder, decoder, lr
        self._validation: list[tuple[Tensor, int]] = []

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.decoder(self.encoder(features).unsqueeze(1))

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        features, signals = batch
        loss = F.mse_loss(self(features), signals)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(signals))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        features, signals = batch
        error = F.mse_loss(self(features), signals, reduction="sum").detach().cpu()
        self._validation.append((error, signals.numel()))

    def on_validation_epoch_end(self) -> None:
        error = float(sum(e for e, _ in self._validation)) / sum(n for _, n in self._validation)
        self._validation.clear()
        self.log("val_error", error, prog_bar=True)
        self.keep_if_best(error)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class UnsupervisedAttack(NetworkAttack):
    """The unsupervised attack; see the module docstring, and ``NetworkAttack`` for the shared arguments.

    Args:
        decoder_widths: hidden widths of the decoder (paper: 64).
        n_neighbors: neighbours per record in the spectral clustering's affinity graph. sklearn's default of
            10 often cut a small tail off the 1-D embeddings in our tests; 50 found the member / non-member split.
        **kwargs: ``NetworkAttack`` arguments. ``outputs`` must include ``"log_output"``, ``loss`` must be on and
            at least one gradient layer must be read: the signals are computed from them.

    ``predict`` returns the hard cluster assignment (True = the member cluster) of the records given together.
    After ``fit``: ``orientation_`` (+1 or -1, applied to the embedding), ``best_epoch_``, ``validation_error_``.
    """

    default_name = "unsupervised"

    def __init__(self, decoder_widths: Sequence[int] = (64,), n_neighbors: int = 50, **kwargs) -> None:
        super().__init__(**kwargs)
        if LOG_OUTPUT not in self.outputs or not self.loss:
            raise ValueError(
                f"the {self.name} attack computes its signals from the prediction vector and the loss: "
                f"outputs must include {LOG_OUTPUT!r} and loss must be True"
            )
        if self.gradients == ():
            raise ValueError(f"the {self.name} attack needs at least one gradient layer for the gradient-norm signal")
        if isinstance(decoder_widths, str) or not all(
            isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in decoder_widths
        ):
            raise ValueError(f"decoder_widths must be a sequence of positive ints, got {decoder_widths!r}")
        check_positive_int(n_neighbors, "n_neighbors")
        self.decoder_widths, self.n_neighbors = tuple(decoder_widths), n_neighbors

    def fit(self, train_members: FeatureSet, train_nonmembers: FeatureSet) -> UnsupervisedAttack:
        """Train the encoder on the pool of both sets; their membership labels are NOT used."""
        members, nonmembers = check_known_sets(train_members, train_nonmembers)
        inputs = self._check_same_inputs(members, nonmembers)
        names = [name for spec in inputs for name in spec.names]
        signals = torch.cat([membership_signals(pool, self.gradients) for pool in (members, nonmembers)])
        std = signals.std(dim=0)
        standardised = (signals - signals.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))
        records = RecordBatches([self._select(members, names), self._select(nonmembers, names)], standardised.float())
        (train_indices,), (validation,) = held_out_split(
            [torch.arange(len(records))], self.validation_fraction, self.seed
        )
        with seeded(self.seed):
            encoder = AttackNetwork(inputs, **self.network_args)
            encoder.fit_input_scaling(records[batch][0] for batch in chunks(train_indices, EVALUATION_CHUNK))
            hidden = self.decoder_widths[-1] if self.decoder_widths else 1
            decoder = nn.Sequential(
                fc_stack(1, self.decoder_widths, self.network_args["dropout"]), nn.Linear(hidden, len(SIGNALS))
            )
            init_weights(decoder, self.network_args["init_std"])
            module = ReconstructionModule(encoder, decoder, self.lr)
            sampler = StratifiedBatchSampler([train_indices], self.batch_size, self.seed)
            self._train(module, records, sampler, validation)
        self.inputs_, self.network_ = inputs, encoder
        self.best_epoch_, self.validation_error_ = module.best_epoch, module.best_value
        embedding = self._fit_resolution(self._network_outputs(encoder, records, torch.arange(len(records))))
        self.orientation_ = 1.0
        if len(np.unique(embedding)) > 1:  # a fully collapsed embedding (warned about) has no clusters to orient by
            is_member = self._member_cluster(embedding, signals[:, SIGNALS.index("gradient_norm")].numpy())
            self.orientation_ = -1.0 if embedding[is_member].mean() < embedding[~is_member].mean() else 1.0
        return self

    def _embed(self, features: FeatureSet) -> np.ndarray:
        selected = self._fitted_inputs(check_feature_set(features, "features"))
        records = RecordBatches([selected], torch.zeros(len(features)))
        return self._at_resolution(self._network_outputs(self.network_, records, torch.arange(len(features))))

    def _member_cluster(self, embedding: np.ndarray, gradient_norm: np.ndarray) -> np.ndarray:
        """Spectral clustering of the embeddings into two; True for the cluster with the smaller gradient norm."""
        if len(embedding) < MIN_CLUSTERED_RECORDS:
            raise ValueError(
                f"the {self.name} attack clusters the records it is given and needs at least {MIN_CLUSTERED_RECORDS}, "
                f"got {len(embedding)}"
            )
        clustering = SpectralClustering(
            n_clusters=2,
            affinity="nearest_neighbors",
            n_neighbors=min(self.n_neighbors, len(embedding) - 1),
            random_state=self.seed,
        )
        with warnings.catch_warnings():
            # A kNN graph of 1-D embeddings with many ties may be disconnected; the split is still usable.
            warnings.filterwarnings("ignore", "Graph is not fully connected")
            clusters = clustering.fit_predict(embedding[:, None])
        if len(np.unique(clusters)) < 2:
            raise ValueError(f"the {self.name} attack's embeddings of these records form a single cluster")
        nonmember_cluster = int(np.argmax([gradient_norm[clusters == c].mean() for c in (0, 1)]))
        return clusters != nonmember_cluster

    def score(self, features: FeatureSet) -> np.ndarray:
        """The embedding, oriented at ``fit`` so that members score higher; record by record."""
        embedding = self._embed(features)  # refuses an unfitted attack first
        return self.orientation_ * embedding

    def predict(self, features: FeatureSet) -> np.ndarray:
        """The paper's hard assignment: True for the member cluster of the records given together."""
        embedding = self._embed(features)
        gradient_norm = membership_signals(features, self.gradients)[:, SIGNALS.index("gradient_norm")].numpy()
        return self._member_cluster(embedding, gradient_norm)
