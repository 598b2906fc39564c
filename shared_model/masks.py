"""SecAgg+ masks from SHA-256 in counter mode.

Flower 1.42 expands a 32-byte SecAgg+ seed (a site's private-mask seed, or a pairwise key agreed
by ECDH) into masks with ``pseudo_rand_gen``, which folds the seed into 32 bits (XOR of its
4-byte words) to seed NumPy's MT19937: whoever sees a masked vector can search those 2^32 seeds
for a pairwise mask (flwrlabs/flower issue 7522). FedCMR's nodes and server expand the whole
seed instead: block ``i`` of the stream is ``SHA-256(DOMAIN || seed || i)``, read as
little-endian 32-bit words (64-bit where the range is not a power of two up to 2^32) and
reduced modulo the range, which is exact for the power-of-two ranges SecAgg+ uses.

Both sides must use the same generator, so the ClientApp and the ServerApp each install it into
the Flower module that calls it (``client.app``, ``server.app``). A node running stock Flower
mods against a FedCMR server makes masks that do not cancel: that round's sum is noise, which
the server's aggregate check refuses; every vector stays masked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

DOMAIN = b"fedcmr/secagg+/mask/sha256-ctr/v1"
BLOCK = 32  # bytes of one SHA-256 output


def _stream(seed: bytes, nbytes: int) -> bytes:
    """Blocks SHA-256(DOMAIN || len(seed) || seed || i), i = 0, 1, ... (64-bit little-endian);
    the prefix is hashed once and its state copied per block."""
    prefix = hashlib.sha256(DOMAIN + len(seed).to_bytes(2, "little") + seed)
    blocks = -(-nbytes // BLOCK)
    out = bytearray()
    for i in range(blocks):
        block = prefix.copy()
        block.update(i.to_bytes(8, "little"))
        out += block.digest()
    return bytes(out[:nbytes])


def sha256_ctr_masks(seed: bytes, num_range: int,
                     dimensions_list: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Uniform int64 masks in [0, num_range), one array per shape, from the whole ``seed``
    (the signature of Flower's ``pseudo_rand_gen``)."""
    if len(seed) < 16:
        raise ValueError(f"a mask seed of {len(seed)} bytes is too short (at least 16)")
    if not 1 < num_range <= 2**63:
        raise ValueError(f"mask range {num_range} must lie in (1, 2^63]")
    exact = num_range & (num_range - 1) == 0 and num_range <= 2**32
    word = np.dtype("<u4") if exact else np.dtype("<u8")
    counts = [int(np.prod(shape)) if len(shape) else 1 for shape in dimensions_list]
    words = np.frombuffer(_stream(seed, sum(counts) * word.itemsize), dtype=word).astype(np.uint64)
    values = (words % np.uint64(num_range)).astype(np.int64)
    out: list[np.ndarray] = []
    start = 0
    for shape, count in zip(dimensions_list, counts, strict=True):
        chunk = values[start:start + count]
        out.append(np.array(chunk[0], dtype=np.int64) if len(shape) == 0 else chunk.reshape(shape))
        start += count
    return out
