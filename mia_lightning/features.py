"""Per-example white-box features (layer outputs, weight gradients, loss, label) for the attacks of PAPER.md.

How it is fast: with the model in eval mode the examples of a batch are independent, so ONE batched forward
(forward hooks keep each chosen layer's input and output) and ONE backward of the summed per-example losses
give every example's exact back-propagated error ``dL_n/d(output_n)`` at the chosen layers. The backward
is ``torch.autograd.grad`` w.r.t. those layer outputs only: nothing is accumulated into ``param.grad`` and
autograd skips the weight gradients and every layer below the lowest chosen one. From (input, error):
- Linear, factorised (default): keep ``activation`` (the layer input) and ``error``; the weight gradient is
  their outer product ``dL/dW[o, i] = error[o] * activation[i]`` and is never materialised.
- Linear, full: ``activation[:, :, None] * error[:, None, :]`` laid out ``(in, out)``.
- Conv2d: ``unfold(input) @ error^T`` per example, laid out ``(in_channels * kh * kw, out)``: the row order of
  ``weight.view(out, -1)``, transposed, so a 1 x out kernel of the attack reads one input unit per row.
Records are processed in chunks, so memory is bounded by the chunk; with ``out_dir`` each chunk goes straight
to preallocated ``.npy`` files and the result is read back memory-mapped.

Confident predictions: a member the model fits with logit margin 40 has loss ~4e-18, but float32 (and
float64) ``log(1 + 4e-18)`` is 0, and so is ``1 - p_y``. Membership attacks rank records by exactly these tiny
values, so the loss is computed as ``softplus(logsumexp_{j != y} z_j - z_y)`` (``per_example_loss``) and the
prediction is also available in log space (``"log_output"``, log-softmax of the logits), where
``1 - p_y = sum_{j != y} p_j`` stays representable.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import Tensor, nn
from torch.utils.data import DataLoader, SequentialSampler

OUTPUT = "output"  # the special output name: the model's softmax prediction vector
LOG_OUTPUT = "log_output"  # the special output name: the log-softmax of the logits (no saturation at p = 1)
PREDICTIONS = (OUTPUT, LOG_OUTPUT)  # output names that are computed from the logits, not read from a module
GRADIENT_LAYERS = (nn.Linear, nn.Conv2d)
PER_RECORD = ("label", "target")  # features of the record itself: no snapshot axis
INDEX_FILE = "features.json"
FORMAT_VERSION = 1

Records = DataLoader | tuple[Tensor, Tensor]


@dataclass(frozen=True)
class FeatureSpec:
    """Which white-box features to extract.

    Args:
        outputs: module names whose (flattened) outputs to keep; ``"output"`` is the softmax prediction and
            ``"log_output"`` its logarithm, computed stably from the logits.
        gradients: names of ``nn.Linear`` / ``nn.Conv2d`` modules whose per-example WEIGHT gradient to keep.
        loss: keep the per-example cross-entropy loss (``per_example_loss``).
        label: keep the one-hot label.
        factorise_linear: keep a linear layer's gradient as (activation, error), not the in x out matrix.
    """

    outputs: tuple[str, ...] = (OUTPUT,)
    gradients: tuple[str, ...] = field(default_factory=tuple)
    loss: bool = True
    label: bool = True
    factorise_linear: bool = True

    def __post_init__(self) -> None:
        # Configs give lists; a frozen spec should hold tuples.
        for attr in ("outputs", "gradients"):
            names = getattr(self, attr)
            if isinstance(names, str):
                raise ValueError(
                    f"FeatureSpec.{attr} must be a sequence of module names, got the string {names!r}"
                )
            names = tuple(names)
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"FeatureSpec.{attr} names {duplicates} more than once")
            object.__setattr__(self, attr, names)

    def validate(self, model: nn.Module) -> None:
        """Refuse unknown module names, or gradients of layers that are not Linear/Conv2d; list valid ones."""
        modules = {name: module for name, module in model.named_modules() if name}
        unknown = [name for name in self.outputs if name not in PREDICTIONS and name not in modules]
        if unknown:
            valid = ", ".join([*PREDICTIONS, *modules])
            raise ValueError(f"unknown output layer(s) {unknown}; valid names: {valid}")
        gradient_layers = [name for name, module in modules.items() if isinstance(module, GRADIENT_LAYERS)]
        invalid = [name for name in self.gradients if name not in gradient_layers]
        if invalid:
            raise ValueError(
                f"gradient layer(s) {invalid} are not nn.Linear / nn.Conv2d modules of the model; "
                f"valid names: {', '.join(gradient_layers)}"
            )
        grouped = [n for n in self.gradients if isinstance(modules[n], nn.Conv2d) and modules[n].groups != 1]
        if grouped:
            raise ValueError(f"gradients of grouped convolutions are not supported: {grouped}")


class FeatureSet:
    """Feature name -> tensor with the record axis N first (and the snapshot axis T second where it applies).

    ``len()`` is the number of records, as for a dataset; ``names`` lists the features.
    """

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        if not tensors:
            raise ValueError("a FeatureSet needs at least one feature")
        lengths = {name: t.shape[0] if t.dim() else None for name, t in tensors.items()}
        if len(set(lengths.values())) != 1 or None in lengths.values():
            raise ValueError(f"every feature needs the same leading record axis; got {lengths}")
        self._tensors = dict(tensors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tensors)

    def __len__(self) -> int:
        return next(iter(self._tensors.values())).shape[0]

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._tensors:
            raise KeyError(f"no feature {name!r}; features: {', '.join(self._tensors)}")
        return self._tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def items(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self._tensors.items())

    def __repr__(self) -> str:
        shapes = ", ".join(f"{name}: {tuple(t.shape)}" for name, t in self._tensors.items())
        return f"FeatureSet(N={len(self)}, {shapes})"

    def index(self, idx: Any) -> dict[str, Tensor]:
        """Rows ``idx`` (int, slice, index list or tensor) of every feature: an attack's batch."""
        return {name: t[idx] for name, t in self._tensors.items()}

    def gradient_norm(self, layer: str) -> Tensor:
        """Per-example Frobenius norm of ``layer``'s weight gradient, (N, T).

        Factorised, ||outer(error, activation)|| = ||error|| * ||activation||: no in x out matrix needed.
        """
        if f"grad/{layer}" in self._tensors:
            return self._tensors[f"grad/{layer}"].flatten(2).norm(dim=2)
        if f"grad/{layer}/activation" in self._tensors:
            activation = self._tensors[f"grad/{layer}/activation"]
            error = self._tensors[f"grad/{layer}/error"]
            return activation.norm(dim=2) * error.norm(dim=2)
        layers = sorted({name.split("/")[1] for name in self._tensors if name.startswith("grad/")})
        raise KeyError(f"no gradient features for layer {layer!r}; layers with gradients: {layers}")

    def save(self, directory: str | os.PathLike) -> Path:
        """One ``.npy`` per feature plus ``features.json``, written last: a partial save is never loadable."""
        directory = Path(directory)
        _refuse_existing(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = _file_names(self.names)
        for name, t in self._tensors.items():
            np.save(directory / files[name], t.detach().cpu().numpy(), allow_pickle=False)
        entries = {name: _index_entry(files[name], t.shape, t.dtype) for name, t in self._tensors.items()}
        _write_index(directory, entries, len(self))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, mmap: bool = True) -> FeatureSet:
        """Read a saved FeatureSet; memory-mapped copy-on-write, so indexing reads only the rows asked for."""
        directory = Path(directory)
        index_path = directory / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(f"no {INDEX_FILE} in {directory}: not a saved FeatureSet")
        try:
            index = json.loads(index_path.read_text())
            entries = index["features"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index_path} is not a FeatureSet index: {err}") from err
        tensors = {}
        for name, entry in entries.items():
            path = directory / entry["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{index_path} lists {path}, which does not exist")
            try:
                array = np.load(path, mmap_mode="c" if mmap else None, allow_pickle=False)
            except ValueError as err:
                raise ValueError(f"{path} is not a readable .npy file: {err}") from err
            if list(array.shape) != entry["shape"] or str(array.dtype) != entry["dtype"]:
                raise ValueError(
                    f"{path} holds {array.dtype}{list(array.shape)} but {index_path} says "
                    f"{entry['dtype']}{entry['shape']}"
                )
            tensors[name] = torch.from_numpy(array)
        return cls(tensors)


def extract_whitebox_features(
    models: nn.Module | Sequence[nn.Module],
    data: Records,
    spec: FeatureSpec,
    *,
    chunk_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
    out_dir: str | os.PathLike | None = None,
) -> FeatureSet:
    """Per-example features of ``data`` under each model (snapshot), stacked along axis 1 (T).

    Args:
        models: one model, or the snapshots of one model in time order (all the same architecture).
        data: ``(x, y)`` tensors, or a DataLoader yielding ``(x, y, ...)`` batches in record order
            (a sequential sampler, no ``drop_last``): row n of every feature is record n.
        spec: which features; see ``FeatureSpec``.
        chunk_size: records per batched forward/backward; memory is bounded by it.
        device: where to compute; models are moved there and back.
        progress: show a progress bar.
        out_dir: write the features there as ``.npy`` files and return them memory-mapped.

    Returns a FeatureSet with ``output/<name>`` (N, T, d), ``loss`` (N, T, 1), ``label`` (N, C),
    ``target`` (N,), ``grad/<name>/activation`` (N, T, in) and ``grad/<name>/error`` (N, T, out) for
    factorised linear layers, ``grad/<name>`` (N, T, rows, out) otherwise. Features are float32 (float64 if
    the model is).
    The models' train/eval modes, devices and ``requires_grad`` flags are as before on return, hooks removed.
    """
    models = [models] if isinstance(models, nn.Module) else list(models)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise ValueError("models must be an nn.Module or a non-empty sequence of nn.Modules")
    if len({id(model) for model in models}) != len(models):
        raise ValueError("the same model object is given twice: each snapshot needs its own model")
    for model in models:
        spec.validate(model)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    device = torch.device(device)
    if out_dir is not None:
        _refuse_existing(Path(out_dir))
    num_records, batches = _record_batches(data, chunk_size)
    if num_records == 0:
        raise ValueError("there are no records to extract features for")

    store: _ArrayStore | _NpyStore | None = None
    start = 0
    with ExitStack() as stack:
        taps = [stack.enter_context(_tapped(model, spec, device)) for model in models]
        bar = stack.enter_context(Progress(disable=not progress))
        task = bar.add_task("white-box features", total=num_records)
        for x, y in batches:
            if start + len(y) > num_records:
                raise ValueError(f"data yielded more than the {num_records} records its dataset has")
            x, y = x.to(device), y.to(device)
            rows = _stack_snapshots([tap.features(x, y) for tap in taps])
            if store is None:
                store = (
                    _NpyStore(Path(out_dir), num_records, rows) if out_dir else _ArrayStore(num_records, rows)
                )
                stack.callback(store.close)
            store.write(start, rows)
            start += len(y)
            bar.advance(task, len(y))
    if store is None or start != num_records:
        raise ValueError(f"data yielded {start} records, but its dataset has {num_records}")
    return store.finish()


class _Tap:
    """Forward hooks on one model that keep what a batched forward/backward needs for the features."""

    def __init__(self, model: nn.Module, spec: FeatureSpec) -> None:
        self.model = model
        self.spec = spec
        self.modules = dict(model.named_modules())
        self.outputs: dict[str, Tensor] = {}
        self.layer_inputs: dict[str, Tensor] = {}
        self.layer_outputs: dict[str, Tensor] = {}
        hooked = dict.fromkeys([n for n in spec.outputs if n not in PREDICTIONS] + list(spec.gradients))
        self.handles = [self.modules[name].register_forward_hook(self._hook(name)) for name in hooked]

    def _hook(self, name: str):
        keep_output = name in self.spec.outputs
        keep_gradient = name in self.spec.gradients

        def hook(module: nn.Module, args: tuple, output: Any) -> Tensor:
            if not isinstance(output, Tensor):
                raise ValueError(f"module {name!r} returned a {type(output).__name__}, not a tensor")
            if name in self.layer_outputs or name in self.outputs:
                raise ValueError(
                    f"module {name!r} ran more than once in one forward: its features are ambiguous"
                )
            if keep_output:
                self.outputs[name] = output.detach().reshape(len(output), -1).clone()
            if not keep_gradient:
                return output
            self.layer_inputs[name] = args[0].detach()
            # A leaf that requires grad when nothing upstream does (frozen or first layers), so autograd
            # reaches it without touching the parameters' requires_grad flags.
            tapped = output if output.requires_grad else output.detach().requires_grad_()
            self.layer_outputs[name] = tapped
            # Downstream gets a copy: an in-place op there (ReLU(inplace=True)) must not rewrite `tapped`.
            return tapped.clone()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def features(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        self.outputs.clear()
        self.layer_inputs.clear()
        self.layer_outputs.clear()
        with torch.set_grad_enabled(bool(self.spec.gradients)):
            logits = self.model(x)
            if logits.dim() != 2:
                raise ValueError(
                    f"the model must map a batch to logits (N, C); got shape {tuple(logits.shape)}"
                )
            if y.min() < 0 or y.max() >= logits.shape[1]:
                raise ValueError(
                    f"targets must be class indices in [0, {logits.shape[1]}), got {y.unique().tolist()}"
                )
            losses = per_example_loss(logits, y)
            names = list(self.spec.gradients)
            errors = (
                torch.autograd.grad(losses.sum(), [self.layer_outputs[n] for n in names]) if names else ()
            )
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        rows: dict[str, Tensor] = {}
        for name in self.spec.outputs:
            if name == OUTPUT:
                rows[f"output/{name}"] = F.softmax(logits.detach(), dim=1)
            elif name == LOG_OUTPUT:
                rows[f"output/{name}"] = F.log_softmax(logits.detach(), dim=1)
            else:
                rows[f"output/{name}"] = self.outputs[name]
        if self.spec.loss:
            rows["loss"] = losses.detach().unsqueeze(1)
        for name, error in zip(names, errors):
            layer, activation = self.modules[name], self.layer_inputs[name]
            if isinstance(layer, nn.Linear) and self.spec.factorise_linear:
                if activation.dim() != 2:
                    raise ValueError(
                        f"layer {name!r} sees inputs of shape {tuple(activation.shape)}: its per-example "
                        "gradient sums outer products over the extra axes; use factorise_linear=False"
                    )
                rows[f"grad/{name}/activation"] = activation
                rows[f"grad/{name}/error"] = error
            elif isinstance(layer, nn.Linear):
                rows[f"grad/{name}"] = linear_weight_gradients(activation, error)
            else:
                rows[f"grad/{name}"] = conv2d_weight_gradients(layer, activation, error)
        rows = {name: t.to(dtype) for name, t in rows.items()}
        if self.spec.label:
            rows["label"] = torch.zeros(len(y), logits.shape[1], dtype=dtype, device=y.device).scatter_(
                1, y[:, None], 1.0
            )
        rows["target"] = y.long()
        return rows


def per_example_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy -log p_y of each row of ``logits`` (N, C), as ``softplus(logsumexp_{j != y} z_j - z_y)``.

    The same value and gradient as ``F.cross_entropy(..., reduction="none")``, but exact to the last bit for
    confident predictions: ``log(sum_j exp(z_j)) - z_y`` rounds ``log(1 + exp(-margin))`` to 0 once the
    margin passes ~17 (float32) or ~37 (float64), while ``softplus`` of the negative margin keeps it
    (~exp(-margin)). The gradient keeps ``1 - p_y`` as ``sigmoid(-margin)`` too, so back-propagated errors do
    not vanish either.
    """
    is_target = F.one_hot(targets, logits.shape[1]).bool()
    others = logits.masked_fill(is_target, float("-inf")).logsumexp(dim=1)
    margin = logits.gather(1, targets[:, None]).squeeze(1) - others
    return torch.logaddexp(torch.zeros_like(margin), -margin)  # softplus(-margin), with no linear cut-off


def linear_weight_gradients(activation: Tensor, error: Tensor) -> Tensor:
    """Per-example weight gradients of a Linear layer, (N, in, out), from its input and output error."""
    # Inputs with extra axes (N, ..., in) sum one outer product per position.
    n = activation.shape[0]
    activation = activation.reshape(n, -1, activation.shape[-1])
    return torch.bmm(activation.transpose(1, 2), error.reshape(n, -1, error.shape[-1]))


def conv2d_weight_gradients(conv: nn.Conv2d, layer_input: Tensor, error: Tensor) -> Tensor:
    """Per-example weight gradients of a Conv2d layer, (N, in_channels * kh * kw, out), via unfold."""
    # Pad as Conv2d.forward does (any padding mode, 'same' included), then unfold without padding.
    if any(conv._reversed_padding_repeated_twice):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        layer_input = F.pad(layer_input, conv._reversed_padding_repeated_twice, mode=mode)
    columns = F.unfold(layer_input, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    return torch.bmm(columns, error.flatten(2).transpose(1, 2))


@contextmanager
def _tapped(model: nn.Module, spec: FeatureSpec, device: torch.device) -> Iterator[_Tap]:
    """The model in eval mode on ``device``, hooked; modes, device and hooks restored however we leave."""
    modes = {module: module.training for module in model.modules()}
    original_device = next((p.device for p in model.parameters()), device)
    tap = None
    try:
        model.eval()
        if original_device != device:
            model.to(device)
        tap = _Tap(model, spec)
        yield tap
    finally:
        if tap is not None:
            tap.remove()
        if original_device != device:
            model.to(original_device)
        for module, training in modes.items():
            module.training = training


def _stack_snapshots(per_model: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Per-model rows -> (b, T, ...) per feature; snapshots of one architecture must agree on every shape."""
    if len(per_model) == 1:  # a view, not a copy
        return {name: t if name in PER_RECORD else t.unsqueeze(1) for name, t in per_model[0].items()}
    rows = {}
    for name, first in per_model[0].items():
        if name in PER_RECORD:
            rows[name] = first
            continue
        shapes = {tuple(model_rows[name].shape) for model_rows in per_model}
        if len(shapes) != 1:
            raise ValueError(
                f"the snapshot models disagree on the shape of feature {name!r}: {sorted(shapes)}"
            )
        rows[name] = torch.stack([model_rows[name] for model_rows in per_model], dim=1)
    return rows


def _record_batches(data: Records, chunk_size: int) -> tuple[int, Iterator[tuple[Tensor, Tensor]]]:
    """The number of records and an iterator over (x, y) chunks of at most ``chunk_size``, in record order."""
    if isinstance(data, DataLoader):
        if not isinstance(data.sampler, SequentialSampler):
            raise ValueError(
                f"the DataLoader draws records with a {type(data.sampler).__name__}: features must keep the "
                "record order, use shuffle=False"
            )
        if data.drop_last:
            raise ValueError(
                "the DataLoader drops its last batch (drop_last=True): every record needs features"
            )
        try:
            num_records = len(data.dataset)
        except TypeError as err:
            raise ValueError("the DataLoader's dataset has no length: cannot size the features") from err
        return num_records, _chunks(_loader_pairs(data), chunk_size)
    if isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} records but y has {y.shape[0]}")
        _check_targets(y)
        return x.shape[0], _chunks(iter([(x, y)]), chunk_size)
    raise ValueError(f"data must be a DataLoader or an (x, y) pair of tensors, got {type(data).__name__}")


def _loader_pairs(loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
    for batch in loader:
        if not isinstance(batch, tuple | list) or len(batch) < 2:
            raise ValueError(f"the DataLoader must yield (x, y, ...) batches, got a {type(batch).__name__}")
        x, y = batch[0], batch[1]
        _check_targets(y)
        yield x, y


def _check_targets(y: Tensor) -> None:
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(
            f"targets must be a 1-D tensor of class indices, got {y.dtype} of shape {tuple(y.shape)}"
        )


def _chunks(pairs: Iterator[tuple[Tensor, Tensor]], chunk_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    for x, y in pairs:
        for s in range(0, x.shape[0], chunk_size):
            yield x[s : s + chunk_size].detach(), y[s : s + chunk_size]


class _ArrayStore:
    """Preallocated in-memory tensors, filled chunk by chunk."""

    def __init__(self, num_records: int, rows: Mapping[str, Tensor]) -> None:
        self.tensors = {
            name: torch.empty((num_records, *t.shape[1:]), dtype=t.dtype) for name, t in rows.items()
        }

    def write(self, start: int, rows: Mapping[str, Tensor]) -> None:
        for name, t in rows.items():
            self.tensors[name][start : start + t.shape[0]] = t

    def close(self) -> None:
        """Nothing to release: the tensors are the result."""

    def finish(self) -> FeatureSet:
        return FeatureSet(self.tensors)


class _NpyStore:
    """Preallocated ``.npy`` files, written chunk by chunk with ``pwrite``.

    ``open_memmap`` only lays out each file (header + full size); writing through a mapping would keep every
    written page in this process' resident memory, while ``pwrite`` leaves them to the page cache.
    """

    def __init__(self, directory: Path, num_records: int, rows: Mapping[str, Tensor]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.num_records = directory, num_records
        self.files = _file_names(list(rows))
        self.layout: dict[str, tuple[int, int, int]] = {}  # name -> (fd, data offset, bytes per record)
        self.entries: dict[str, dict[str, Any]] = {}
        for name, t in rows.items():
            path = directory / self.files[name]
            shape = (num_records, *t.shape[1:])
            array = np.lib.format.open_memmap(path, mode="w+", dtype=_numpy_dtype(t.dtype), shape=shape)
            offset, row_bytes = array.offset, array.dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
            del array
            self.layout[name] = (os.open(path, os.O_WRONLY), offset, row_bytes)
            self.entries[name] = _index_entry(self.files[name], shape, t.dtype)

    def write(self, start: int, rows: Mapping[str, Tensor]) -> None:
        for name, t in rows.items():
            fd, offset, row_bytes = self.layout[name]
            buffer = memoryview(np.ascontiguousarray(t.detach().cpu().numpy())).cast("B")
            position = offset + start * row_bytes
            while buffer:
                written = os.pwrite(fd, buffer, position)
                buffer, position = buffer[written:], position + written

    def close(self) -> None:
        for fd, _, _ in self.layout.values():
            os.close(fd)
        self.layout.clear()

    def finish(self) -> FeatureSet:
        _write_index(self.directory, self.entries, self.num_records)
        return FeatureSet.load(self.directory, mmap=True)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(str(dtype).removeprefix("torch."))


def _file_names(names: Sequence[str]) -> dict[str, str]:
    files = {name: name.replace("/", "__") + ".npy" for name in names}
    if len(set(files.values())) != len(files):
        raise ValueError(f"feature names {list(names)} collide as file names")
    return files


def _refuse_existing(directory: Path) -> None:
    if (directory / INDEX_FILE).exists():
        raise ValueError(f"{directory} already holds a FeatureSet ({INDEX_FILE}); choose another directory")


def _index_entry(file: str, shape: Sequence[int], dtype: torch.dtype) -> dict[str, Any]:
    return {"file": file, "shape": list(shape), "dtype": str(_numpy_dtype(dtype))}


def _write_index(directory: Path, entries: Mapping[str, dict[str, Any]], num_records: int) -> None:
    index = {"format": FORMAT_VERSION, "num_records": num_records, "features": dict(entries)}
    tmp = directory / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, directory / INDEX_FILE)
