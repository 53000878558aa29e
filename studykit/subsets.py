"""The data-size axis: a nested share of the training conversation trees, chosen by a hash of each tree's id, so the
trees of a 0.25 subset are all in the 0.5 subset, whose trees are all in the whole split. Only the training split is
cut; dev and test stay whole, so every data size is chosen on and scored by the same texts."""

from __future__ import annotations

import hashlib
from typing import Sequence

# A tree's place in [0, 1): the first 8 bytes of the SHA-256 of its id, which no seed, order or split size changes.
HASH_BYTES = 8


def tree_position(tree_id: str) -> float:
    digest = hashlib.sha256(str(tree_id).encode("utf-8")).digest()[:HASH_BYTES]
    return int.from_bytes(digest, "big") / 2 ** (8 * HASH_BYTES)


def in_fraction(tree_id: str, fraction: float) -> bool:
    """A tree is in every fraction above its position: the subsets are nested by construction."""
    return fraction >= 1.0 or tree_position(tree_id) < fraction


def subset_indices(tree_ids: Sequence[str], fraction: float) -> list[int]:
    """The responses (by index) whose conversation tree is in the fraction; all of a tree's responses go together."""
    return [index for index, tree_id in enumerate(tree_ids) if in_fraction(tree_id, fraction)]
