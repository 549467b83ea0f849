"""copy_checksum: one pass over memory, the same digest as hashing the landed payload."""

from __future__ import annotations

import numpy as np
import pytest

from dyn.shuttle.blocks import ONE_PASS_ABOVE_BYTES, ONE_PASS_PIECE_BYTES, checksum, copy_checksum


@pytest.mark.parametrize("size", [1, 4096, ONE_PASS_ABOVE_BYTES, ONE_PASS_ABOVE_BYTES + 1,
                                  3 * ONE_PASS_PIECE_BYTES + ONE_PASS_ABOVE_BYTES + 17])
def test_copy_checksum_lands_the_payload_and_hashes_it_like_checksum(size):
    src = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    dest = np.zeros(size, dtype=np.uint8)
    got = copy_checksum(dest, src)
    assert np.array_equal(dest, src)
    assert got == checksum(src) == checksum(dest)


def test_copy_checksum_sees_a_different_payload():
    size = ONE_PASS_ABOVE_BYTES * 2
    src = np.zeros(size, dtype=np.uint8)
    dest = np.empty(size, dtype=np.uint8)
    before = copy_checksum(dest, src)
    src[size - 1] = 1  # the last piece
    assert copy_checksum(dest, src) != before
