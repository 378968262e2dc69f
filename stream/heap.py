"""Give freed heap memory back to the operating system after big transient allocations.

A checkpoint serialises ~200 MB and an experience allocates its minibatches on
the background thread, whose glibc arena keeps the freed pages: resident
memory then creeps up although nothing live grows. ``trim()`` (glibc's
``malloc_trim``) hands them back; it runs on the background thread after
each write and each experience. A no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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
