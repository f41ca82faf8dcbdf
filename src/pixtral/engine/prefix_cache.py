"""Content hashes for prefix caching: images by their pixels, KV blocks by everything before them.

A full block of `block_size` tokens is named by a chained hash: the hash of the block before
it, the block's token ids, and the content hashes of the images whose [IMG] tokens fall in the
block. Two requests share a block exactly when everything up to the end of that block (text
and image pixels) is the same, so the KV values stored there are the same.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

DIGEST_BYTES = 16


def hash_image(image: torch.Tensor) -> bytes:
    """Content hash of a preprocessed image tensor (shape, dtype and values)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    h.update(repr((tuple(image.shape), str(image.dtype))).encode())
    h.update(image.detach().cpu().contiguous().numpy().tobytes())
    return h.digest()


def hash_block(parent: bytes | None, token_ids: Sequence[int], image_hashes: Sequence[bytes] = ()) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    h.update(parent or b"\0" * DIGEST_BYTES)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    for image in image_hashes:
        h.update(image)
    return h.digest()
