"""SecAgg+ masks from the whole seed (SHA-256 counter mode), installed on both sides."""

import numpy as np
import pytest

from shared_model.masks import sha256_ctr_masks

SHAPES = [(), (3, 4), (1000,)]


def test_masks_are_reproducible_in_range_and_shaped() -> None:
    seed = bytes(range(32))
    first, again = sha256_ctr_masks(seed, 2**32, SHAPES), sha256_ctr_masks(seed, 2**32, SHAPES)
    assert [m.shape for m in first] == SHAPES and all(m.dtype == np.int64 for m in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    values = np.concatenate([m.ravel() for m in sha256_ctr_masks(seed, 2**20, [(50_000,)])])
    assert values.min() >= 0 and values.max() < 2**20
    # uniform: each of 16 bins within 0.005 of its share 1/16 (~4.6 standard deviations)
    counts = np.bincount(values >> 16, minlength=16)
    assert np.all(np.abs(counts / len(values) - 1 / 16) < 0.005)
    odd = sha256_ctr_masks(seed, 1000, [(10_000,)])[0]  # not a power of two: 64-bit words
    assert odd.min() >= 0 and odd.max() < 1000


def test_every_byte_of_the_seed_counts_where_flowers_fold_loses_them() -> None:
    # Prepare: two seeds with the same XOR of their 4-byte words (Flower's 32-bit fold)
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    a = bytes(range(32))
    b = bytearray(a)
    for i in range(4):  # flip the same bits in words 0 and 1: the XOR fold is unchanged
        b[i] ^= 0xA5
        b[4 + i] ^= 0xA5
    b = bytes(b)
    # Check: Flower's generator gives the two seeds the same mask; FedCMR's does not
    assert np.array_equal(pseudo_rand_gen(a, 2**32, [(64,)])[0], pseudo_rand_gen(b, 2**32, [(64,)])[0])
    assert not np.array_equal(sha256_ctr_masks(a, 2**32, [(64,)])[0], sha256_ctr_masks(b, 2**32, [(64,)])[0])


def test_short_seeds_and_bad_ranges_are_refused() -> None:
    with pytest.raises(ValueError, match="too short"):
        sha256_ctr_masks(b"1234", 2**32, SHAPES)
    with pytest.raises(ValueError, match="range"):
        sha256_ctr_masks(bytes(32), 1, SHAPES)


def test_client_and_server_apps_install_the_same_generator() -> None:
    import importlib

    import client.app
    import server.app

    node_side = importlib.import_module(client.app.SECAGG_MOD_MODULE).pseudo_rand_gen
    server_side = importlib.import_module(server.app.SECAGG_WORKFLOW_MODULE).pseudo_rand_gen
    assert node_side is sha256_ctr_masks and server_side is sha256_ctr_masks
