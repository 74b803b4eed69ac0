"""Read an offline W&B run back (wandb 0.31 ships no reader for run-*.wandb files).

The file is a 7-byte header (":W&B", a 2-byte magic, a version byte) followed by a LevelDB-style
log: 32 KiB blocks of chunks, each chunk a 7-byte header (crc32c, length, type) and its bytes;
a record is one FULL chunk or FIRST, MIDDLE..., LAST. Records are wandb_internal_pb2.Record.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2 as pb

FILE_HEADER = 7
BLOCK = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> Iterator[pb.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    offset, parts = FILE_HEADER, []
    while offset + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < CHUNK_HEADER:  # block trailer: zero padding
            offset += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset:offset + CHUNK_HEADER])
        if kind == 0:
            break  # zeroed tail of a file that was not closed cleanly
        parts.append(data[offset + CHUNK_HEADER:offset + CHUNK_HEADER + length])
        offset += CHUNK_HEADER + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def _items(updates) -> Iterator[tuple[list[str], Any]]:
    for item in updates:
        yield (list(item.nested_key) or [item.key]), json.loads(item.value_json)


def _set(target: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = value


@dataclass
class OfflineRun:
    run: pb.RunRecord = None
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)   # one dict per logged step
    summary: dict = field(default_factory=dict)
    artifacts: list[pb.ArtifactRecord] = field(default_factory=list)
    exit_code: int | None = None


def read_run(path: Path) -> OfflineRun:
    """Config, history, summary and artifacts of the run in `path` (a run-*.wandb file or its folder)."""
    path = Path(path)
    if path.is_dir():
        (path,) = path.glob("run-*.wandb")
    out = OfflineRun()
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.run = record.run
            for keys, value in _items(record.run.config.update):
                _set(out.config, keys, value)
        elif kind == "config":
            for keys, value in _items(record.config.update):
                _set(out.config, keys, value)
        elif kind == "history":
            row: dict = {}
            for keys, value in _items(record.history.item):
                _set(row, keys, value)
            out.history.append(row)
        elif kind == "summary":
            for keys, value in _items(record.summary.update):
                _set(out.summary, keys, value)
        elif kind == "artifact":
            out.artifacts.append(record.artifact)
        elif kind == "exit":
            out.exit_code = record.exit.exit_code
    return out
