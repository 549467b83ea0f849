import os
import subprocess
import sys

import pytest

from dyn.errors import RequestError
from dyn.kv.hashing import HASH_MASK, BlockHashCache, hash_block, hash_blocks

TOKENS = list(range(100, 140))


def test_only_full_blocks_are_hashed():
    assert len(hash_blocks(TOKENS, 16)) == 2
    assert hash_blocks(TOKENS[:15], 16) == []
    assert len(hash_blocks(TOKENS[:32], 16)) == 2


def test_chain_matches_hash_block():
    h = hash_blocks(TOKENS, 16)
    h0 = hash_block(None, TOKENS[:16])
    assert h == [h0, hash_block(h0, TOKENS[16:32])]


def test_parent_continues_a_chain():
    h = hash_blocks(TOKENS, 8)
    assert hash_blocks(TOKENS[8:], 8, parent=h[0]) == h[1:]


def test_hash_names_the_whole_prefix():
    a = hash_blocks([1] * 16 + [2] * 16, 16)
    b = hash_blocks([3] * 16 + [2] * 16, 16)
    assert a[1] != b[1]  # same tokens in block 1, different parent


def test_salt_separates_tenants():
    assert hash_blocks(TOKENS, 16, salt=0) != hash_blocks(TOKENS, 16, salt=7)
    assert hash_blocks(TOKENS, 16, salt=2**64 - 1)[0] != hash_blocks(TOKENS, 16)[0]


def test_root_differs_from_zero_parent():
    assert hash_block(None, TOKENS[:4]) != hash_block(0, TOKENS[:4])


def test_range_is_63_bits():
    hashes = hash_blocks(list(range(16 * 500)), 16)
    assert all(0 <= h <= HASH_MASK < 2**63 for h in hashes)
    assert len(set(hashes)) == 500


def test_known_value_is_stable():
    # The encoding is a wire contract (router, shuttle, other hosts): never change silently.
    assert hash_blocks([1, 2, 3, 4], 2) == [4136795118780441843, 3067660616128879371]


def test_stable_across_processes():
    code = "from dyn.kv.hashing import hash_blocks; print(hash_blocks(list(range(64)), 16, salt=5))"
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, check=True, timeout=60).stdout)
    assert outs == {str(hash_blocks(list(range(64)), 16, salt=5)) + "\n"}


@pytest.mark.parametrize("tokens, where", [([1, -1, 3, 4], "index 1"),
                                            ([1, 2, 2**32, 4], "index 2"),
                                            ([1, "x", 3, 4], "index 1")])
def test_bad_tokens_are_named(tokens, where):
    with pytest.raises(RequestError, match=where) as err:
        hash_blocks(tokens, 2)
    assert err.value.field == "token_ids"


@pytest.mark.parametrize("kwargs, field", [({"block_size": 0}, "block_size"),
                                            ({"block_size": 2, "salt": -1}, "salt"),
                                            ({"block_size": 2, "parent": 2**64}, "parent")])
def test_bad_arguments(kwargs, field):
    with pytest.raises(RequestError) as err:
        hash_blocks([1, 2, 3, 4], **kwargs)
    assert err.value.field == field


def test_cache_gives_hash_blocks_results_over_shared_prefixes_salts_and_clears():
    import random

    rng = random.Random(3)
    cache = BlockHashCache(max_entries=64)  # small: the memory is cleared many times over
    prefixes = [[rng.randrange(2**32) for _ in range(16 * 5)] for _ in range(3)]
    for _ in range(300):
        tokens = rng.choice(prefixes) + [rng.randrange(50_000) for _ in range(rng.randrange(40))]
        salt = rng.choice([0, 7, 2**64 - 1])
        assert cache.hash_blocks(tokens, 16, salt) == hash_blocks(tokens, 16, salt)
        assert len(cache._memo) <= 64
    assert cache.hash_blocks(TOKENS[:15], 16) == []
    for kwargs, field in (({"block_size": 0}, "block_size"), ({"block_size": 2, "salt": -1}, "salt")):
        with pytest.raises(RequestError) as err:
            cache.hash_blocks([1, 2, 3, 4], **kwargs)
        assert err.value.field == field
    with pytest.raises(RequestError, match="index 1"):
        cache.hash_blocks([1, -1, 3, 4], 2)
