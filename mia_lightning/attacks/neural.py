"""What the learned attacks (white-box, black-box NN, unsupervised) share: which features they read, how those
map onto the attack network's components, and checks that scoring sees the same features as fitting did.

The features one extraction produced may serve several attacks, so each attack picks its own features by name
and ignores the rest, and reads only the last ``snapshots`` snapshots of the time axis.

A score is a function of its record alone, to the last bit: the network runs on one record at a time (a
batched matrix product may round a row differently depending on its batch), and outputs are rounded to a
resolution fixed at ``fit`` (``SCORE_BITS``), so that a network whose outputs differ only by rounding noise
ranks nothing. The audit scores members and non-members in separate calls; before this, a collapsed network
scored AUC 1.0 from the two batches' different rounding.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from mia_lightning.attacks.base import Attack, check_positive_int
from mia_lightning.attacks.network import (
    COMPONENT_WIDTHS,
    DROPOUT,
    ENCODER_WIDTHS,
    INIT_STD,
    KERNELS,
    AttackNetwork,
    ComponentInput,
    check_network_args,
)
from mia_lightning.attacks.training import (
    EVALUATION_CHUNK,
    BestEpochModule,
    RecordBatches,
    chunks,
    torch_threads,
    train,
)
from mia_lightning.features import GRADIENT_LAYERS, LOG_OUTPUT, PER_RECORD, FeatureSet, FeatureSpec

# Scores are rounded to 2^-SCORE_BITS of the typical (median) |output| on the attacker's own records. The network
# computes in float32 (24 bits) and each output accumulates rounding over hundreds of units and several layers:
# differences below ~2^-16 of the outputs' magnitude are that noise, and differ between BLAS kernels, thread
# counts and machines. A network collapsed to a constant (all outputs equal up to that noise) then gives tied
# scores and an AUC of 0.5, instead of ranking records by rounding error. The median, not the largest |output|:
# a few misclassified records with outputs of +-30 must not coarsen the resolution for the bulk near 0.
SCORE_BITS = 16


def last_gradient_layer(model: nn.Module) -> str:
    """The name of the model's last Linear / Conv2d module: the paper's leakiest gradient."""
    names = [name for name, module in model.named_modules() if name and isinstance(module, GRADIENT_LAYERS)]
    if not names:
        raise ValueError("the model has no nn.Linear or nn.Conv2d layer whose gradient could be attacked")
    return names[-1]


def _names(value: Sequence[str] | None, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a sequence of module names, got {value!r}")
    return tuple(value)


class NetworkAttack(Attack):
    """Base of the attacks that train an ``AttackNetwork`` on features of the target model.

    Args:
        outputs: layer outputs to read. The default ``"log_output"`` is the prediction vector as log-softmax
            (computed from the logits: no information added, but confident predictions keep their
            differences, where the paper's softmax ``"output"`` rounds p_y to 1.0 and the rest to ~0 for every
            memorised member and most non-members alike).
        gradients: layers whose weight gradient to read; ``None`` = the model's last Linear / Conv2d layer
            (resolved by ``feature_spec(model)``, so call it before ``fit``), ``()`` = none.
        loss, label: read the loss and the one-hot label.
        snapshots: read the last ``snapshots`` snapshots of each feature; ``None`` reads every snapshot and
            needs at least 2 (the multi-snapshot attack).
        kernels, component_widths, encoder_widths, dropout, init_std: the network (see ``AttackNetwork``).
        lr, max_epochs, batch_size: Adam's step size, epochs, records per batch. The paper's lr 1e-4 for 100
            epochs is too slow for a CPU audit; lr 1e-3 (the authors' own code) with best-epoch selection
            reaches the same plateau in far fewer epochs: on the digits audit 15, 20 and 30 epochs gave the
            same AUC within +-0.01.
        validation_fraction: share of the attacker's own records held out to choose the best epoch.
        seed: same features + seed -> same scores.
        progress: show a progress bar while training.
        accelerator: Lightning accelerator for training; scoring runs on the CPU.
        num_threads: torch's CPU threads while training and scoring (restored after); None leaves them as they
            are. The networks are small (batches of 64 records): with 2 threads on a busy 2-core machine the
            digits audit took 9x the CPU time it takes with 1. Raise it for wide gradient components.
        name: the name results are reported under; defaults to the class's ``default_name``.
    """

    default_name: str

    def __init__(
        self,
        outputs: Sequence[str] = (LOG_OUTPUT,),
        gradients: Sequence[str] | None = None,
        loss: bool = True,
        label: bool = True,
        snapshots: int | None = 1,
        kernels: int = KERNELS,
        component_widths: Sequence[int] = COMPONENT_WIDTHS,
        encoder_widths: Sequence[int] = ENCODER_WIDTHS,
        dropout: float = DROPOUT,
        init_std: float | None = INIT_STD,
        lr: float = 1e-3,
        max_epochs: int = 20,
        batch_size: int = 64,
        validation_fraction: float = 0.2,
        seed: int = 0,
        progress: bool = True,
        accelerator: str = "auto",
        num_threads: int | None = 1,
        name: str | None = None,
    ) -> None:
        self.outputs = _names(outputs, "outputs")
        self.gradients = _names(gradients, "gradients")
        self.loss, self.label = bool(loss), bool(label)
        if snapshots is not None:
            check_positive_int(snapshots, "snapshots")
        self.snapshots = snapshots
        check_network_args(kernels, tuple(component_widths), tuple(encoder_widths), dropout, init_std)
        self.network_args = {
            "kernels": kernels,
            "component_widths": tuple(component_widths),
            "encoder_widths": tuple(encoder_widths),
            "dropout": dropout,
            "init_std": init_std,
        }
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        check_positive_int(max_epochs, "max_epochs")
        check_positive_int(batch_size, "batch_size")
        if batch_size % 2:
            raise ValueError(f"batch_size must be even (half members, half non-members), got {batch_size}")
        if not 0.0 < validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.lr, self.max_epochs, self.batch_size = lr, max_epochs, batch_size
        self.validation_fraction, self.seed = validation_fraction, seed
        if num_threads is not None:
            check_positive_int(num_threads, "num_threads")
        self.progress, self.accelerator, self.num_threads = progress, accelerator, num_threads
        self.name = name or self.default_name
        self.inputs_: tuple[ComponentInput, ...] | None = None
        self.network_: AttackNetwork | None = None
        self.resolution_: float | None = None

    def feature_spec(self, model: nn.Module) -> FeatureSpec:
        """Also fixes the gradient layer when ``gradients`` is None: the model's last Linear / Conv2d."""
        if self.gradients is None:
            self.gradients = (last_gradient_layer(model),)
        spec = FeatureSpec(outputs=self.outputs, gradients=self.gradients, loss=self.loss, label=self.label)
        spec.validate(model)
        return spec

    def _component_inputs(self, features: FeatureSet) -> tuple[ComponentInput, ...]:
        """Map the features this attack reads onto network inputs, checking presence and the snapshot axis."""
        if self.gradients is None:
            raise ValueError(
                f"the {self.name} attack reads the target's last layer gradient: call feature_spec(model) "
                "before fit, or name the layers with gradients=[...]"
            )
        vectors = [f"output/{layer}" for layer in self.outputs]
        vectors += ["loss"] if self.loss else []
        vectors += ["label"] if self.label else []
        missing = [name for name in vectors if name not in features]
        inputs = [("vector", (name,)) for name in vectors if name in features]
        for layer in self.gradients:
            pair = (f"grad/{layer}/activation", f"grad/{layer}/error")
            if all(name in features for name in pair):
                inputs.append(("factorised_gradient", pair))
            elif f"grad/{layer}" in features:
                inputs.append(("gradient", (f"grad/{layer}",)))
            else:
                missing.append(f"grad/{layer}")
        if missing:
            raise ValueError(
                f"the {self.name} attack needs features {missing}; the FeatureSet has {list(features.names)}"
            )
        if not inputs:
            raise ValueError(f"the {self.name} attack reads no features: give it outputs, gradients, loss or label")
        selected = self._select(features, [name for _, names in inputs for name in names])
        result = []
        for kind, names in inputs:
            if kind == "vector":
                shape = (int(np.prod(selected[names[0]].shape[1:])),)
            elif kind == "gradient":
                shape = tuple(selected[names[0]].shape[1:])
            else:
                activation, error = (selected[name] for name in names)
                shape = (activation.shape[1], activation.shape[2], error.shape[2])
            result.append(ComponentInput(kind, names, shape, log_scale=names == ("loss",)))
        return tuple(result)

    def _select(self, features: FeatureSet, names: Sequence[str]) -> dict[str, Tensor]:
        """Views of ``names``, time-axis features cut to the last ``snapshots`` snapshots."""
        timed = [name for name in names if name not in PER_RECORD]
        lengths = {features[name].shape[1] for name in timed}
        if len(lengths) > 1:
            raise ValueError(f"the features disagree on the number of snapshots: {sorted(lengths)}")
        available = lengths.pop() if lengths else None
        if available is not None and self.snapshots is None and available < 2:
            raise ValueError(f"the {self.name} attack reads every snapshot and needs at least 2; the features have 1")
        if available is not None and self.snapshots is not None and available < self.snapshots:
            raise ValueError(
                f"the {self.name} attack reads the last {self.snapshots} snapshots; the features have {available}"
            )
        keep = self.snapshots or available
        return {name: features[name][:, -keep:] if name in timed else features[name] for name in names}

    def _fitted_inputs(self, features: FeatureSet) -> dict[str, Tensor]:
        """The selected features of a scoring set, refused unless they match what the attack was fitted on."""
        if self.inputs_ is None or self.network_ is None:
            raise ValueError(f"the {self.name} attack is not fitted: call fit() first")
        inputs = self._component_inputs(features)
        if inputs != self.inputs_:
            raise ValueError(
                f"the {self.name} attack was fitted on features {_describe(self.inputs_)}, "
                f"but these are {_describe(inputs)}"
            )
        return self._select(features, [name for spec in inputs for name in spec.names])

    def _check_same_inputs(self, members: FeatureSet, nonmembers: FeatureSet) -> tuple[ComponentInput, ...]:
        inputs = self._component_inputs(members)
        other = self._component_inputs(nonmembers)
        if inputs != other:
            raise ValueError(
                f"known members and non-members have different features: {_describe(inputs)} vs {_describe(other)}"
            )
        return inputs

    def _network_outputs(self, network: AttackNetwork, records: RecordBatches, indices: Tensor) -> np.ndarray:
        """The network's pre-sigmoid outputs for ``indices`` of ``records``, float64, in eval mode.

        One record per forward pass, on its own freshly allocated copy: a batched matrix product may round a
        row differently depending on the batch it sits in (kernel choice, blocking, alignment), and a record's
        score must not depend, even in the last bit, on which other records are scored with it.
        """
        network.eval()
        outputs = []
        with torch.no_grad(), torch_threads(self.num_threads):
            for batch in chunks(indices, EVALUATION_CHUNK):
                features, _ = records[batch]
                for row in range(len(batch)):
                    record = {name: t[row : row + 1].clone() for name, t in features.items()}
                    outputs.append(network(record).double())
        return torch.cat(outputs).numpy() if outputs else np.zeros(0)

    def _train(self, module: BestEpochModule, records: RecordBatches, sampler: Sampler, validation: Tensor) -> None:
        """Train ``module`` on batches of ``records`` drawn by ``sampler``, choosing its epoch on ``validation``."""
        with torch_threads(self.num_threads):
            train(
                module,
                DataLoader(records, batch_size=None, sampler=sampler),
                DataLoader(records, batch_size=None, sampler=chunks(validation, EVALUATION_CHUNK)),
                self.max_epochs,
                self.name if self.progress else None,
                self.accelerator,
            )

    def _fit_resolution(self, outputs: np.ndarray) -> np.ndarray:
        """Fix ``resolution_`` from the outputs on the attacker's own records; return them at that resolution."""
        scale = float(np.median(np.abs(outputs))) if len(outputs) else 0.0
        self.resolution_ = scale * 2.0**-SCORE_BITS if scale > 0 else 1.0
        rounded = self._at_resolution(outputs)
        distinct = len(np.unique(rounded))
        if distinct < max(2, len(rounded) // 2):
            warnings.warn(
                f"the {self.name} attack's network gives only {distinct} distinct scores to its {len(rounded)} "
                f"known records at resolution {self.resolution_:.3g}: it has (nearly) collapsed to a constant, "
                "and its scores rank records little better than chance",
                stacklevel=3,
            )
        return rounded

    def _at_resolution(self, outputs: np.ndarray) -> np.ndarray:
        """Outputs rounded to ``resolution_``: differences finer than float32 rounding noise rank nothing."""
        if self.resolution_ is None:
            raise ValueError(f"the {self.name} attack is not fitted: call fit() first")
        return np.round(outputs / self.resolution_) * self.resolution_


def _describe(inputs: Sequence[ComponentInput]) -> str:
    return ", ".join(f"{'+'.join(spec.names)} {spec.shape}" for spec in inputs)
