"""The attack network of Nasr et al. (2019): one component per feature, their outputs concatenated and encoded.

- a vector feature (a layer output, the loss, the one-hot label) goes through an FC component;
- a weight gradient, seen as a (rows x out) matrix, goes through a Conv2d with K kernels of size 1 x out (one
  response per row and kernel), then an FC component;
- the concatenated component outputs go through the encoder FC 256 -> 128 -> 64 -> 1 (pre-sigmoid output).

With T snapshots the T copies of a feature are stacked before its component: vector features are concatenated,
gradients become the conv's T input channels. A factorised Linear gradient (activation a, error e; the matrix
is a e^T) is never materialised: kernel k on row r responds sum_t a_t[r] * (kernel_{k,t} . e_t), which costs
O(T K (rows + out)) per record instead of O(T K rows out).

Inputs are standardised with statistics of the attacker's training records (``fit_input_scaling``), kept as
buffers, so a score still depends on the record alone: a vector feature per coordinate (mean 0, variance 1), a
gradient by one scale per tensor (root mean square 1), which keeps the factorised gradient an outer product.
The loss is read as log(loss) (``ComponentInput.log_scale``): it spans orders of magnitude (1e-6 for a
memorised member, 1e-3 for a typical non-member, 10 for a misclassified one) and membership lives in those
orders; on a linear scale nearly every record's loss is ~0 to the network.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

InputKind = Literal["vector", "gradient", "factorised_gradient"]

# Paper, appendix table. The paper's 1,000 kernels turn a 128-row gradient into a 128,000-wide input of the
# next FC layer (16M weights for one component): minutes per epoch on a CPU. On the digits audit 8, 16 and 64
# kernels gave the same AUC (within +-0.01 over 3 targets x 4 seeds) and 64 cost 2.5x the CPU time of 16;
# raise ``kernels`` for large targets on a GPU.
COMPONENT_WIDTHS = (128, 64)
ENCODER_WIDTHS = (256, 128, 64)
KERNELS = 16
DROPOUT = 0.2
# None: PyTorch's default (fan-in scaled) init. The paper's N(0, 0.01) shrinks the signal ~10x per layer through
# the 5-6 layers between an input and the output: with a few batches per epoch the supervised attack learned
# slowly, and the unsupervised encoder collapsed to a constant embedding. 0.01 remains available.
INIT_STD: float | None = None
LOG_FLOOR = torch.finfo(torch.float32).tiny  # log-scaled inputs: an exact 0 (loss below float32) reads as this


@dataclass(frozen=True)
class ComponentInput:
    """The features one component reads and their per-record shape.

    ``names``: one feature, or (activation, error) for a factorised gradient. ``shape``: ``(size,)`` for a
    vector (flattened, snapshots included), ``(snapshots, rows, out)`` for a gradient. ``log_scale``: the
    network reads log(x) of this (positive) vector feature.
    """

    kind: InputKind
    names: tuple[str, ...]
    shape: tuple[int, ...]
    log_scale: bool = False


def check_network_args(
    kernels: int,
    component_widths: Sequence[int],
    encoder_widths: Sequence[int],
    dropout: float,
    init_std: float | None,
) -> None:
    """Refuse hyperparameters that would build a broken network, before anything is trained."""
    if isinstance(kernels, bool) or not isinstance(kernels, int) or kernels < 1:
        raise ValueError(f"kernels must be a positive int, got {kernels!r}")
    for what, widths in (("component_widths", component_widths), ("encoder_widths", encoder_widths)):
        if (
            isinstance(widths, str)
            or not widths
            or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths)
        ):
            raise ValueError(f"{what} must be a non-empty sequence of positive ints, got {widths!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if init_std is not None and not init_std > 0.0:
        raise ValueError(f"init_std must be > 0 or None, got {init_std}")


def init_weights(network: nn.Module, init_std: float | None) -> None:
    """The paper's init: Linear / Conv2d weights ~ N(0, init_std^2), biases 0; None keeps PyTorch's default."""
    if init_std is None:
        return
    for module in network.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, init_std)
            nn.init.zeros_(module.bias)


def fc_stack(in_features: int, widths: Sequence[int], dropout: float) -> nn.Sequential:
    """Linear -> ReLU -> Dropout for each width."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(dropout)]
        in_features = width
    return nn.Sequential(*layers)


class GradientComponent(nn.Module):
    """Conv2d(T -> K kernels of 1 x out) over a (rows x out) gradient, ReLU, dropout, then an FC component."""

    def __init__(
        self, snapshots: int, rows: int, out: int, kernels: int, widths: Sequence[int], dropout: float
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(snapshots, kernels, kernel_size=(1, out))
        self.dropout = nn.Dropout(dropout)
        self.fc = fc_stack(kernels * rows, widths, dropout)

    def responses(self, gradient: Tensor) -> Tensor:
        """Pre-activation conv responses (N, K, rows) of materialised gradients (N, T, rows, out)."""
        return self.conv(gradient).squeeze(3)

    def factorised_responses(self, activation: Tensor, error: Tensor) -> Tensor:
        """The same responses from activation (N, T, rows) and error (N, T, out), without the matrix."""
        kernels = self.conv.weight.squeeze(2)  # (K, T, out)
        projected = torch.einsum("nto,kto->ntk", error, kernels)  # kernel_{k,t} . e_t
        return torch.einsum("ntr,ntk->nkr", activation, projected) + self.conv.bias[:, None]

    def forward(self, *gradient: Tensor) -> Tensor:
        """``forward(matrix)`` or ``forward(activation, error)`` -> (N, widths[-1])."""
        responses = self.factorised_responses(*gradient) if len(gradient) == 2 else self.responses(*gradient)
        return self.fc(self.dropout(torch.relu(responses).flatten(1)))


class Standardise(nn.Module):
    """(x - shift) / scale with buffers fitted on training records: per coordinate, or one scalar each."""

    def __init__(self, size: int | None) -> None:
        super().__init__()
        shape = (size,) if size is not None else ()
        self.register_buffer("shift", torch.zeros(shape))
        self.register_buffer("scale", torch.ones(shape))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.shift) / self.scale


class AttackNetwork(nn.Module):
    """Maps a batch {feature name: tensor} to one pre-sigmoid output per record, (N,).

    ``init_std=None`` (the default) keeps PyTorch's init; a number draws weights from N(0, init_std^2) with
    biases 0, the paper's init for 0.01 (see INIT_STD). Call ``fit_input_scaling`` before training.
    """

    def __init__(
        self,
        inputs: Sequence[ComponentInput],
        kernels: int = KERNELS,
        component_widths: Sequence[int] = COMPONENT_WIDTHS,
        encoder_widths: Sequence[int] = ENCODER_WIDTHS,
        dropout: float = DROPOUT,
        init_std: float | None = INIT_STD,
    ) -> None:
        super().__init__()
        check_network_args(kernels, component_widths, encoder_widths, dropout, init_std)
        if not inputs:
            raise ValueError("the attack network needs at least one input feature")
        self.inputs = tuple(inputs)
        components, scalings = [], []
        for spec in self.inputs:
            if spec.kind == "vector":
                components.append(fc_stack(spec.shape[0], component_widths, dropout))
                scalings.append(nn.ModuleList([Standardise(spec.shape[0])]))
            else:
                snapshots, rows, out = spec.shape
                components.append(GradientComponent(snapshots, rows, out, kernels, component_widths, dropout))
                scalings.append(nn.ModuleList([Standardise(None) for _ in spec.names]))
        self.components = nn.ModuleList(components)
        self.scalings = nn.ModuleList(scalings)
        encoder = fc_stack(len(components) * component_widths[-1], encoder_widths, dropout)
        encoder.append(nn.Linear(encoder_widths[-1], 1))
        self.encoder = encoder
        init_weights(self, init_std)

    def _raw_inputs(self, spec: ComponentInput, batch: Mapping[str, Tensor]) -> list[Tensor]:
        """The tensors ``spec`` names, vectors flattened and log-scaled where asked, before standardisation."""
        tensors = [batch[name] for name in spec.names]
        if spec.kind != "vector":
            return tensors
        vector = tensors[0].flatten(1)
        return [torch.log(vector.clamp_min(LOG_FLOOR)) if spec.log_scale else vector]

    @torch.no_grad()
    def fit_input_scaling(self, batches: Iterable[Mapping[str, Tensor]]) -> None:
        """Set the input standardisation from batches of training records, in one pass of float64 sums.

        A vector is standardised per coordinate; a gradient tensor only divided by the root mean square of its
        entries. A constant coordinate (a class no training record has) is left unscaled instead of divided by 0.
        """
        # Per input tensor: [count, sum, sum of squares] over the records (vector) or over every entry (gradient).
        totals = [[[0, 0.0, 0.0] for _ in spec.names] for spec in self.inputs]
        for batch in batches:
            for spec, tensor_totals in zip(self.inputs, totals):
                for tensor, total in zip(self._raw_inputs(spec, batch), tensor_totals):
                    values = tensor.double() if spec.kind == "vector" else tensor.double().reshape(-1, 1)
                    total[0] += len(values)
                    total[1] = total[1] + values.sum(dim=0)
                    total[2] = total[2] + (values**2).sum(dim=0)
        for spec, scalings, tensor_totals in zip(self.inputs, self.scalings, totals):
            for scaling, (count, total, total_squares) in zip(scalings, tensor_totals):
                if count == 0:
                    raise ValueError("no training records to fit the input scaling on")
                if spec.kind == "vector":
                    shift = total / count
                    spread = torch.sqrt(torch.clamp(total_squares / count - shift**2, min=0.0))
                else:
                    shift = torch.zeros((), dtype=torch.float64)
                    spread = torch.sqrt(total_squares / count).reshape(())
                scaling.shift.copy_(shift)
                scaling.scale.copy_(torch.where(spread > 1e-12 * (1.0 + shift.abs()), spread, torch.ones_like(spread)))

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        encoded = []
        for spec, component, scalings in zip(self.inputs, self.components, self.scalings):
            tensors = [scale(t) for scale, t in zip(scalings, self._raw_inputs(spec, batch))]
            encoded.append(component(*tensors))
        return self.encoder(torch.cat(encoded, dim=1)).squeeze(1)
