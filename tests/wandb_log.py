"""Read back what an offline W&B run wrote: its ``.wandb`` file is a LevelDB-style log of protobuf records.

wandb 0.31 writes the file from its Go core and no longer ships a Python reader, so the tests carry this small one
(format: 7-byte file header ``:W&B`` + magic + version, then 32 KiB blocks of chunks, each with a 7-byte header:
crc32c, length, type FULL/FIRST/MIDDLE/LAST).
"""

from __future__ import annotations

import glob
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B log"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # block trailer padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:
            pos += room
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        else:
            pending += chunk
        record = pb.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending = b""
    return records


def run_log(run_dir: str | Path) -> Path:
    files = glob.glob(str(Path(run_dir) / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(files) == 1, f"expected one offline W&B run under {run_dir}, found {files}"
    return Path(files[0])


def history_keys(records: list[pb.Record]) -> set[str]:
    return {
        item.key or "/".join(item.nested_key)
        for r in records
        if r.WhichOneof("record_type") == "history"
        for item in r.history.item
    }


def summary_keys(records: list[pb.Record]) -> set[str]:
    return {
        item.key or "/".join(item.nested_key)
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for item in r.summary.update
    }


def run_record(records: list[pb.Record]) -> pb.RunRecord:
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs, "no run record in the W&B log"
    return runs[0]
