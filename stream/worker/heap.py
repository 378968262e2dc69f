"""The process heap of a long-running worker: freed memory back to the OS, startup objects out of the GC's way.

``trim()``: a checkpoint serialises the whole learner and an experience allocates its
minibatches on a background thread, whose glibc arena keeps the freed pages:
resident memory then creeps up although nothing live grows. glibc's
``malloc_trim`` hands them back; it runs on the background threads after
each write and each experience. A no-op off glibc.

``freeze_startup_objects()``: the model, tokenizer and libraries leave hundreds
of thousands of objects the cyclic garbage collector tracks, and each full
collection walks all of them with the GIL held, whenever enough new objects
have survived (events in flight do; the measured cost: docs/performance.md). ``gc.freeze()`` moves what exists
at startup -- alive for the whole run -- out of its reach; reference counting
still frees them. ``Worker.connect()`` freezes, ``Worker.close()`` thaws (a
process that goes on, such as a test run, can then collect what it dropped).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)


def _load():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _load()


def trim() -> None:
    if _malloc_trim is not None:
        try:
            _malloc_trim(0)
        except Exception as exc:  # noqa: BLE001 - best effort
            log.debug("malloc_trim failed: %s", exc)


def freeze_startup_objects() -> int:
    """Collect, then exempt every object alive now from later cyclic collections; returns how
    many are exempt. For a process's long-lived objects: cyclic garbage among them is never freed."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def thaw() -> None:
    """Undo ``freeze_startup_objects``: everything frozen is collectable again."""
    gc.unfreeze()
