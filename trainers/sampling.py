"""The order a stage visits its examples in: a seeded permutation per epoch, optionally with
grounding requests about one image paired side by side (`StageSpec.same_image_pairs`), and how many
steps its schedule takes.

A decoder trained from scratch first learns one mask per image; a batch that holds "the left
hemisphere" and "the right hemisphere" of the same slice is what makes that answer expensive, and
what the contrast loss (`losses.pair_contrast`) reads its pairs from. Pairs are formed per image
(the stage's contrast pairs first, then any two different structures), and the epoch is laid out in
units of two, so with an even micro-batch a pair never straddles two batches. With several workers
a batch is dealt out `rank::world`, which separates the two halves of a pair; pairing is meant for
one worker.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from medplib.trainers.stages import StageSpec

# What pairing knows of an example: (image, structure) for a grounding request, else None.
PairKey = tuple[str, str] | None


def paired_order(
    keys: Sequence[PairKey], rng: np.random.Generator, preferred: Sequence[tuple[str, str]] = ()
) -> np.ndarray:
    """A permutation of range(len(keys)) in which paired requests sit at positions 2k and 2k + 1."""
    order = rng.permutation(len(keys))
    by_image: dict[str, list[int]] = defaultdict(list)
    singles: list[int] = []
    for index in order:
        key = keys[index]
        if key is None:
            singles.append(int(index))
        else:
            by_image[key[0]].append(int(index))
    pairs: list[tuple[int, int]] = []
    for indices in by_image.values():
        found, rest = _pairs_of_one_image(indices, keys, preferred)
        pairs += found
        singles += rest
    # Single examples go two by two in their shuffled order, so every unit is two long.
    singles = [singles[i] for i in rng.permutation(len(singles))]
    units: list[tuple[int, ...]] = [*pairs]
    units += [tuple(singles[i : i + 2]) for i in range(0, len(singles), 2)]
    odd = [u for u in units if len(u) == 1]  # at most one: it goes last
    even = [u for u in units if len(u) == 2]
    ordered = [even[i] for i in rng.permutation(len(even))] + odd
    return np.array([index for unit in ordered for index in unit], dtype=np.int64)


def _pairs_of_one_image(
    indices: list[int], keys: Sequence[PairKey], preferred: Sequence[tuple[str, str]]
) -> tuple[list[tuple[int, int]], list[int]]:
    """Pairs of one image's requests (preferred structure pairs first, then any two different
    structures) and the requests left over."""
    left = list(indices)
    pairs = []

    def take(structure: str) -> int | None:
        for position, index in enumerate(left):
            if keys[index][1] == structure:
                return left.pop(position)
        return None

    for first, second in preferred:
        while any(keys[i][1] == first for i in left) and any(keys[i][1] == second for i in left):
            pairs.append((take(first), take(second)))
    rest = []
    while left:
        index = left.pop(0)
        partner = next((p for p, other in enumerate(left) if keys[other][1] != keys[index][1]), None)
        if partner is None:
            rest.append(index)
        else:
            pairs.append((index, left.pop(partner)))
    return pairs, rest


def schedule_lengths(spec: StageSpec, num_examples: int, world: int) -> tuple[int, int, int]:
    """(global batch, steps per epoch, warm-up steps) of a stage over `num_examples`."""
    global_batch = spec.optim.batch_size * spec.optim.grad_accum * world
    per_epoch = math.ceil(num_examples / global_batch)
    warmup = max(1, round(spec.optim.warmup_fraction * per_epoch))
    return global_batch, per_epoch, warmup


def total_steps(spec: StageSpec, num_examples: int, world: int, steps: int | None) -> int:
    """The optimizer steps of a stage's schedule: `steps` if given, else its epochs'."""
    _, per_epoch, _ = schedule_lengths(spec, num_examples, world)
    return steps or max(1, round(spec.optim.epochs * per_epoch))


def step_samples(
    step: int,
    num_examples: int,
    global_batch: int,
    per_epoch: int,
    seed: int,
    pair_keys: Sequence[PairKey] | None = None,
    preferred_pairs: Sequence[tuple[str, str]] = (),
) -> np.ndarray:
    """Indices of the global batch of optimizer step `step`; with `pair_keys`, requests about one
    image come in pairs (`sampling.paired_order`)."""
    epoch, offset = divmod(step, per_epoch)
    rng = np.random.default_rng([seed, epoch])
    order = (
        rng.permutation(num_examples) if pair_keys is None else paired_order(pair_keys, rng, preferred_pairs)
    )
    return order[offset * global_batch : (offset + 1) * global_batch]
