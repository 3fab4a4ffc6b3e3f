"""Shards of a run: which images each holds, how it is committed, and the run's identity.

Images are split **by index**: shard ``s`` holds the indices ``[s·S, min((s + 1)·S, N))``
for the shard size ``S`` (never a ``DistributedSampler``, which pads by repeating samples).
Every shard is written into a temporary folder ``OUT/.tmp/shard-NNNNN-<random>/`` and
committed with one ``rename`` to ``OUT/shards/NNNNN/``; its completion marker
``DONE.json`` (image and failure counts) is written, flushed and fsynced before that rename,
so a folder ``shards/NNNNN`` with a ``DONE.json`` is a finished shard and nothing else is. A
run that dies (``kill -9``, power loss, full disk) leaves at most temporary folders, removed
by the next run, and every finished shard stays valid.

A run's identity is ``run-config.json``: the settings that decide its outputs (model and
weights, preprocessing, targets, thresholds, map dtype, batch and shard sizes, data
fingerprint). The first run writes it (exclusively); a rerun into the same ``--out`` must
present the same settings -- it then resumes, skipping finished shards -- or it is refused
with the settings that differ.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import CAMInputError

__all__ = [
    "CONFIG_FILE",
    "DONE_FILE",
    "SHARDS_DIR",
    "TMP_DIR",
    "atomic_write_bytes",
    "atomic_write_text",
    "claim_config",
    "clean_temporaries",
    "commit_shard",
    "completed_shards",
    "shard_dir",
    "shard_name",
    "shard_ranges",
]

SHARDS_DIR = "shards"
TMP_DIR = ".tmp"
DONE_FILE = "DONE.json"
CONFIG_FILE = "run-config.json"


def shard_ranges(num_items: int, shard_size: int) -> list[range]:
    """``[range(s·S, min((s + 1)·S, N)) for s]``: the indices of every shard."""
    if shard_size < 1:
        raise CAMInputError(f"--shard-size must be >= 1, got {shard_size}")
    return [range(s, min(s + shard_size, num_items)) for s in range(0, num_items, shard_size)]


def shard_name(shard: int) -> str:
    """``"00042"``: the folder name of shard 42."""
    return f"{shard:05d}"


def shard_dir(out: Path, shard: int) -> Path:
    """``OUT/shards/NNNNN``."""
    return out / SHARDS_DIR / shard_name(shard)


def completed_shards(out: Path) -> dict[int, dict[str, Any]]:
    """The finished shards of ``out``: ``{shard: its DONE.json}``."""
    done: dict[int, dict[str, Any]] = {}
    base = out / SHARDS_DIR
    if not base.is_dir():
        return done
    for entry in base.iterdir():
        marker = entry / DONE_FILE
        if entry.name.isdigit() and marker.is_file():
            try:
                done[int(entry.name)] = json.loads(marker.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # a marker is written whole before the rename; treat as unfinished
    return done


def clean_temporaries(out: Path) -> int:
    """Remove what interrupted runs left in ``OUT/.tmp``; returns how many entries."""
    tmp = out / TMP_DIR
    if not tmp.is_dir():
        return 0
    count = 0
    for entry in tmp.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        count += 1
    return count


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` via a temporary name in the same folder and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _fsync_write(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` for text (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def commit_shard(out: Path, shard: int, marker: dict[str, Any]) -> Iterator[Path]:
    """Yield a fresh temporary folder for shard ``shard``; when the block ends without an
    error, write ``DONE.json`` (``marker``) into it and rename it to ``shards/NNNNN``
    (replacing an unfinished folder of that name). On an error the temporary folder is
    removed and the error propagates; finished shards are never touched."""
    tmp = out / TMP_DIR / f"shard-{shard_name(shard)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _fsync_write(tmp / DONE_FILE, json.dumps(marker, indent=1, sort_keys=True).encode())
        final = shard_dir(out, shard)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            if (final / DONE_FILE).is_file():  # another process finished it meanwhile
                return
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


def claim_config(out: Path, config: dict[str, Any]) -> bool:
    """Record ``config`` as the identity of ``out``, or check it against the recorded one.

    Returns ``True`` when this call created the record (a new run), ``False`` when an equal
    record existed (a resume).

    Raises:
        CAMInputError: ``out`` holds a run with other settings (the message names them), or
            a ``run-config.json`` that cannot be read.
    """
    path = out / CONFIG_FILE
    text = json.dumps(config, indent=1, sort_keys=True)
    tmp = out / f".{CONFIG_FILE}.{uuid.uuid4().hex[:8]}"
    _fsync_write(tmp, text.encode())
    try:
        os.link(tmp, path)  # exclusive: fails when a record exists
        return True
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CAMInputError(
            f"--out {out} holds an unreadable {CONFIG_FILE} ({err}); use another --out"
        ) from err
    diff = _differences(old, json.loads(text))
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}"[:160] for k in diff[:4])
        raise CAMInputError(
            f"--out {out} holds a run with other settings ({shown}); rerun with the same "
            "settings to resume, or write to a new --out"
        )
    return False
