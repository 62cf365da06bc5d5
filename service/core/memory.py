"""Give freed image memory back to the system (glibc).

glibc raises its mmap threshold each time a large block is freed, so after a burst of
large decodes later frames come from the heap and their memory stays with the process
(the audit saw 1.1-2.6 GiB kept after 8 large uploads). Fixing the threshold keeps
every large buffer (decoded frames, letterboxed inputs) in its own mapping, returned
to the system as soon as it is freed. No effect (and no error) off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("glasses_vision.service")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _libc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def return_large_blocks(threshold: int = 256 * 1024) -> bool:
    """Serve allocations of ``threshold`` bytes and more by mmap (freed at once); True if applied."""
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 4 * threshold))
    if not ok:
        log.warning("mallopt refused the mmap threshold; large frames may stay in the heap after use")
    return ok
