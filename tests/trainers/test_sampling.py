"""Same-image pairs in the epoch order, and the loop's batches built from them."""

from __future__ import annotations

import numpy as np

from medplib.trainers.sampling import paired_order, step_samples

LEFT, RIGHT, GREY, WHITE = "left hemisphere", "right hemisphere", "grey matter", "white matter"


def _keys() -> list:
    keys: list = []
    for image in range(6):
        keys += [(f"brain{image}", s) for s in (LEFT, RIGHT, GREY, WHITE)]
    keys += [("cells0", "cell nuclei"), ("cells1", "cell nuclei"), ("liver", "lesion"), ("liver", "lesion")]
    keys += [None] * 9  # VQA samples
    return keys


def test_paired_order_is_a_permutation_with_pairs_side_by_side() -> None:
    keys = _keys()
    order = paired_order(keys, np.random.default_rng(3), preferred=[(LEFT, RIGHT)])
    assert sorted(order.tolist()) == list(range(len(keys)))
    pairs = [(keys[a], keys[b]) for a, b in zip(order[0::2], order[1::2], strict=False)]
    same_image = [(a, b) for a, b in pairs if a and b and a[0] == b[0]]
    # Every brain slice gives a left/right pair and a grey/white pair; the liver's two identical
    # requests and the single-request images are never paired with each other.
    assert sorted(tuple(sorted((a[1], b[1]))) for a, b in same_image) == sorted(
        [(LEFT, RIGHT)] * 6 + [(GREY, WHITE)] * 6
    )
    assert all(a[1] != b[1] for a, b in same_image)


def test_paired_order_is_seeded_and_reshuffles() -> None:
    keys = _keys()
    first = paired_order(keys, np.random.default_rng([1, 0]), [(LEFT, RIGHT)])
    assert np.array_equal(first, paired_order(keys, np.random.default_rng([1, 0]), [(LEFT, RIGHT)]))
    assert not np.array_equal(first, paired_order(keys, np.random.default_rng([1, 1]), [(LEFT, RIGHT)]))


def test_step_batches_keep_each_pair_together() -> None:
    keys = _keys()
    batches = [
        step_samples(s, len(keys), 8, 5, seed=2, pair_keys=keys, preferred_pairs=[(LEFT, RIGHT)])
        for s in range(5)
    ]
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(keys)))
    for batch in batches:
        structures = {}
        for index in batch:
            if keys[index] is not None:
                structures.setdefault(keys[index][0], []).append(keys[index][1])
        for image, found in structures.items():
            if image.startswith("brain"):
                # pairs never straddle two batches: both halves of each pair are here
                assert (LEFT in found) == (RIGHT in found) and (GREY in found) == (WHITE in found)
