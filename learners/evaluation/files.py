"""Read and write the offline files of docs/formats.md (JSON lines).

A bad line is counted and logged, never fatal: one broken record in a file of
millions should not cost an evaluation run.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generic, Iterable, TypeVar, Union

from learners.records import (BadRecord, Event, Item, event_to_json, item_to_json,
                              parse_event, parse_item)

log = logging.getLogger(__name__)

T = TypeVar("T")
_EXAMPLES_KEPT = 5


@dataclass
class LoadedRecords(Generic[T]):
    """The good records of a file plus what was wrong with the rest."""

    path: Path
    records: list[T] = field(default_factory=list)
    bad: int = 0
    bad_reasons: Counter = field(default_factory=Counter)
    bad_examples: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)


def _read(path: Union[str, Path], parse: Callable[[bytes], object]) -> LoadedRecords:
    path = Path(path)
    loaded = LoadedRecords(path=path)
    with path.open("rb") as handle:
        for lineno, line in enumerate(handle, start=1):
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue  # blank lines are layout, not records
            record = parse(line)
            if isinstance(record, BadRecord):
                loaded.bad += 1
                loaded.bad_reasons[record.reason] += 1
                if len(loaded.bad_examples) < _EXAMPLES_KEPT:
                    loaded.bad_examples.append((lineno, record.reason))
            else:
                loaded.records.append(record)
    if loaded.bad:
        log.warning("%s: skipped %d bad line(s) %s, first at %s", path, loaded.bad,
                    dict(loaded.bad_reasons), loaded.bad_examples)
    return loaded


def read_events(path: Union[str, Path]) -> LoadedRecords[Event]:
    return _read(path, parse_event)


def read_items(path: Union[str, Path]) -> LoadedRecords[Item]:
    return _read(path, parse_item)


def _write(path: Union[str, Path], records: Iterable, encode: Callable[[object], bytes]) -> int:
    # Write beside the target and rename, so a crash never leaves half a file.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("wb") as handle:
        for record in records:
            handle.write(encode(record) + b"\n")
            count += 1
    os.replace(tmp, path)
    return count


def write_events(path: Union[str, Path], events: Iterable[Event]) -> int:
    """Write events one JSON object per line; returns how many were written."""
    return _write(path, events, event_to_json)


def write_items(path: Union[str, Path], items: Iterable[Item]) -> int:
    """Write items one JSON object per line; returns how many were written."""
    return _write(path, items, item_to_json)
