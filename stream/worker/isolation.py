"""The last line of defence against one record stopping the worker.

Validation (``learners.records``) accepts only what every later stage can
handle. Should a record still make a stage fail -- a bug, or an input nobody
thought of -- the batch it came in is retried one record at a time, so the
failure is pinned on that record alone: it is dead-lettered (or, for output,
logged and counted) and the loop goes on. Without this, the worker would
exit, restart, read the same record and exit again, for good.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence, TypeVar

log = logging.getLogger("stream.worker")

T = TypeVar("T")


def apply_isolated(batch: Sequence[T], apply: Callable[[Sequence[T]], object],
                   stage: str) -> list[tuple[T, Exception]]:
    """``apply(batch)``; if it raises, ``apply([one])`` for each element of the batch.

    Returns the elements that fail on their own, each with its error; the rest
    have been applied exactly once. ``apply`` must leave no trace of a call that
    raised (the stages it wraps change their state only once the work has succeeded).
    """
    if not batch:
        return []
    try:
        apply(batch)
        return []
    except Exception as exc:  # noqa: BLE001 - the point: no record may stop the loop
        if len(batch) == 1:
            _log_failure(stage, exc)
            return [(batch[0], exc)]
        log.warning("%s failed for a batch of %d (%s: %s): retrying one record at a time",
                    stage, len(batch), type(exc).__name__, exc)
    failed = []
    for element in batch:
        try:
            apply([element])
        except Exception as exc:  # noqa: BLE001
            _log_failure(stage, exc)
            failed.append((element, exc))
    return failed


def _log_failure(stage: str, exc: Exception) -> None:
    log.error("%s failed for one record; it is set aside and the worker goes on", stage, exc_info=exc)


def failure_detail(exc: Exception) -> str:
    """A short reason for a dead-letter header."""
    return f"{type(exc).__name__}: {exc}"[:300]
