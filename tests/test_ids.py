"""Ids and seeds drawn from a pool of the OS's random bytes (atelier/common/ids.py)."""

import os

from atelier.common import ids


def test_ids_are_fresh_hex_of_the_asked_length_and_bits_stay_in_range():
    drawn = [ids.token_hex(12) for _ in range(2 * ids.POOL_BYTES // 12)]  # across two refills of the pool
    assert all(len(d) == 24 and int(d, 16) >= 0 for d in drawn) and len(set(drawn)) == len(drawn)
    seeds = [ids.random_bits(62) for _ in range(1000)]
    assert all(0 <= s < 2**62 for s in seeds) and max(seeds) >= 2**60  # the top bits are drawn too
    assert len(ids.random_bytes(ids.POOL_BYTES)) == ids.POOL_BYTES  # larger than a pool's share: straight from the OS


def test_a_forked_child_does_not_repeat_its_parent_s_ids():
    ids.token_hex(1)  # the parent holds a pool the child would otherwise inherit
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent
        os.write(write, ids.token_hex(12).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.waitpid(pid, 0)
    os.close(read)
    assert len(child) == 24 and child != ids.token_hex(12)
