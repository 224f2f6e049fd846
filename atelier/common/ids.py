"""Random ids and seeds from the OS's generator, without a system call each.

`os.urandom` (behind `secrets`) lets go of the GIL for its getrandom() call. On the event loop, with a
text engine's thread waiting for the GIL, taking it back cost each call up to one of the engine's Python
phases: in a profile of 1-token completions (ATELIER_RUNTIME=local) the two ids of a request took a tenth
of the loop's time. Here the bytes come from the same generator 4 KiB at a time, and each byte is used
once; a forked child draws a pool of its own.
"""

from __future__ import annotations

import os
import threading

POOL_BYTES = 4096

_lock = threading.Lock()
_pool = b""
_at = 0


def _reset() -> None:
    global _pool, _at
    _pool, _at = b"", 0


os.register_at_fork(after_in_child=_reset)


def random_bytes(n: int) -> bytes:
    """n bytes from the OS's cryptographically secure generator, as `os.urandom(n)`."""
    global _pool, _at
    if n > POOL_BYTES // 4:
        return os.urandom(n)
    with _lock:
        if _at + n > len(_pool):
            _pool, _at = os.urandom(POOL_BYTES), 0
        out = _pool[_at:_at + n]
        _at += n
    return out


def token_hex(n: int) -> str:
    """As `secrets.token_hex(n)`: 2n hex digits of n random bytes."""
    return random_bytes(n).hex()


def random_bits(k: int) -> int:
    """As `secrets.randbits(k)`: a random integer of at most k bits."""
    return int.from_bytes(random_bytes((k + 7) // 8), "big") >> (-k % 8)
