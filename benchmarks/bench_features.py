"""How fast and how lean is white-box feature extraction on the paper's Purchase100 FC model?

(a) our extraction of one batch of 256 / one plain batched forward + backward of the same batch;
(b) the naive per-example loop (forward, loss.backward(), read param.grad) / ours, per example;
(c) peak resident memory added while extracting 20,000 records to disk (out_dir), in a fresh subprocess
    (the kernel's VmHWM high-water mark, see ``peak_memory``), beside the same for 2,000 records to show it
    does not grow with N.
The machine is shared, so each repeat times the two sides back to back and the median of the ratios is kept.
Last line: {"extract_over_plain": a, "naive_over_extract": b, "peak_mb_20k": mb}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mia_lightning.features import FeatureSpec, extract_whitebox_features
from mia_lightning.models import build_model

BATCH = 256
NAIVE_RECORDS = 64
PEAK_RECORDS = (2_000, 20_000)
REPEATS = 9
HIDDEN_OUTPUTS = ("act1", "act2", "act3", "act4")
SPEC = FeatureSpec(outputs=(*HIDDEN_OUTPUTS, "output"), gradients=("fc4", "fc5"), loss=True, label=True)


def purchase_model() -> nn.Module:
    """FC 600 -> 1024 -> 512 -> 256 -> 128 -> 100 with ReLU, as in the paper."""
    torch.manual_seed(0)
    return build_model("purchase_fc", num_classes=100, input_shape=(600,), activation="relu")


def purchase_like_records(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Sparse binary records like Purchase100's (about 10% ones) with random labels."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 600, generator=generator) < 0.1).float()
    return x, torch.randint(0, 100, (n,), generator=generator)


def naive_features(model: nn.Module, x: Tensor, y: Tensor) -> list[dict[str, Tensor]]:
    """The obvious implementation of SPEC: one example at a time, hooks for outputs, param.grad for grads."""
    model.eval()
    modules = dict(model.named_modules())
    seen: dict[str, Tensor] = {}
    handles = [
        modules[name].register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__(name, out.detach().clone())
        )
        for name in HIDDEN_OUTPUTS
    ]
    rows = []
    try:
        for i in range(len(x)):
            model.zero_grad(set_to_none=True)
            logits = model(x[i : i + 1])
            loss = F.cross_entropy(logits, y[i : i + 1])
            loss.backward()
            row = {f"output/{name}": seen[name] for name in HIDDEN_OUTPUTS}
            row["output/output"] = torch.softmax(logits.detach(), dim=1)
            row["loss"] = loss.detach()
            row["label"] = F.one_hot(y[i], 100).float()
            for name in SPEC.gradients:
                row[f"grad/{name}"] = modules[name].weight.grad.clone()
            rows.append(row)
    finally:
        for handle in handles:
            handle.remove()
    return rows


def plain_forward_backward(model: nn.Module, x: Tensor, y: Tensor) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def paired_ratio(numerator: Callable[[], None], denominator: Callable[[], None], scale: float = 1.0) -> tuple:
    """Median over REPEATS of time(numerator) / time(denominator) * scale, each pair timed back to back."""
    for fn in (numerator, denominator):  # warm-up
        fn()
        fn()
    ratios, num_times, den_times = [], [], []
    for _ in range(REPEATS):
        start = time.perf_counter()
        numerator()
        middle = time.perf_counter()
        denominator()
        end = time.perf_counter()
        num_times.append(middle - start)
        den_times.append(end - middle)
        ratios.append((middle - start) / (end - middle) * scale)
    return statistics.median(ratios), statistics.median(num_times), statistics.median(den_times)


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (Linux), in MB."""
    return (
        int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024
    )


def peak_memory(num_records: int, threads: int) -> dict:
    """Run in a fresh subprocess: peak resident memory growth while extracting ``num_records`` to disk.

    Peak RSS is the kernel's high-water mark VmHWM, reset to the current RSS just before extracting (writing 5
    to /proc/self/clear_refs). Not ru_maxrss: Linux carries the parent's peak into a child across fork + exec,
    so in a subprocess of this (torch-loaded) benchmark ru_maxrss would start at the parent's peak.
    """
    torch.set_num_threads(threads)
    model = purchase_model()
    x, y = purchase_like_records(num_records, seed=1)
    model_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_mb("VmRSS")
        start = time.perf_counter()
        features = extract_whitebox_features(model, (x, y), SPEC, chunk_size=BATCH, out_dir=Path(tmp) / "f")
        seconds = time.perf_counter() - start
        peak = _status_mb("VmHWM")
        disk_mb = sum(p.stat().st_size for p in (Path(tmp) / "f").iterdir()) / 2**20
        assert len(features) == num_records
        del features
    return {
        "records": num_records,
        "model_mb": model_mb,
        "rss_before_mb": before,
        "peak_rss_mb": peak,
        "growth_mb": peak - before,
        "features_on_disk_mb": disk_mb,
        "seconds": seconds,
    }


def measure_peak_in_subprocess(num_records: int, threads: int) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--peak-records", str(num_records), "--threads", str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(threads: int) -> None:
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    model = purchase_model()
    x, y = purchase_like_records(BATCH)
    features = extract_whitebox_features(model, (x, y), SPEC)
    print(f"features per record: {sum(features[n][0].numel() for n in features.names)} values, {features}")

    # The naive loop really computes the same features: check before timing it.
    naive = naive_features(model, x[:8], y[:8])
    for i, row in enumerate(naive):
        for name in SPEC.gradients:
            activation = features[f"grad/{name}/activation"][i, 0]
            error = features[f"grad/{name}/error"][i, 0]
            torch.testing.assert_close(
                torch.outer(error, activation), row[f"grad/{name}"], rtol=1e-4, atol=1e-6
            )
        torch.testing.assert_close(features["output/act2"][i, 0], row["output/act2"][0], rtol=1e-4, atol=1e-6)

    def ours() -> None:
        extract_whitebox_features(model, (x, y), SPEC)

    a, ours_s, plain_s = paired_ratio(ours, lambda: plain_forward_backward(model, x, y))
    naive_x, naive_y = x[:NAIVE_RECORDS], y[:NAIVE_RECORDS]
    b, naive_s, ours_s2 = paired_ratio(
        lambda: naive_features(model, naive_x, naive_y), ours, scale=BATCH / NAIVE_RECORDS
    )
    peaks = [measure_peak_in_subprocess(n, threads) for n in PEAK_RECORDS]

    print(
        f"torch threads: {threads}; CPUs: {os.cpu_count()}; 1-min load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (timings from a machine busier than its CPUs are not meaningful)"
    )
    print(
        f"(a) extract {BATCH} records: {ours_s * 1e3:.1f} ms; plain forward+backward: {plain_s * 1e3:.1f} ms;"
        f" median paired ratio {a:.2f} (target <= 2.0)"
    )
    print(
        f"(b) naive per-example loop: {naive_s / NAIVE_RECORDS * 1e3:.3f} ms/record; ours:"
        f" {ours_s2 / BATCH * 1e3:.4f} ms/record; median paired ratio {b:.1f} (target >= 30)"
    )
    for peak in peaks:
        print(
            f"(c) {peak['records']} records to disk in {peak['seconds']:.1f} s"
            f" ({peak['features_on_disk_mb']:.0f} MB of features): peak RSS {peak['peak_rss_mb']:.0f} MB,"
            f" {peak['growth_mb']:.1f} MB above the {peak['rss_before_mb']:.0f} MB before extraction (torch,"
            f" the {peak['model_mb']:.1f} MB model and the records); VmHWM in a fresh subprocess"
        )
    print(
        json.dumps(
            {
                "extract_over_plain": round(a, 3),
                "naive_over_extract": round(b, 1),
                "peak_mb_20k": round(peaks[-1]["growth_mb"], 1),
            }
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the targets assume 2)")
    parser.add_argument(
        "--peak-records", type=int, help="internal: measure peak memory for this many records"
    )
    args = parser.parse_args()
    if args.peak_records:
        print(json.dumps(peak_memory(args.peak_records, args.threads)))
    else:
        main(args.threads)
