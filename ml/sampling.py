"""Which training slices each step draws: every slice equally often, or every subject equally often.

The training set mixes 1 mm volumes (140-180 useful axial slices each) with clinical 3-4 mm scans (36-48). Drawn by
slice, a clinical whole-head scan is a few per cent of the steps; drawn by subject, it is its share of the subjects.
Both orders are seeded by (seed, epoch) alone, so a resumed run draws what the uninterrupted run would have, and
sharded by rank for DistributedDataParallel.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Sequence

import numpy as np

__all__ = ["Sampling", "parse_sampling", "epoch_order"]


class Sampling(str, Enum):
    """How a training epoch draws its slices (``dicomnode train --sampling``)."""

    SLICES = "slices"
    """Every useful slice of every training subject equally often (a subject weighs as many slices as it has)."""
    SUBJECTS = "subjects"
    """Every training subject equally often; within a subject, its slices in a shuffled cycle."""


def parse_sampling(value: object) -> Sampling:
    try:
        return Sampling(value)
    except ValueError:
        raise ValueError(f"sampling must be one of {', '.join(s.value for s in Sampling)}, not {value!r}") from None


def _slice_order(n: int, epoch: int, seed: int, need: int) -> np.ndarray:
    rng = np.random.default_rng([seed, epoch])
    return np.concatenate([rng.permutation(n) for _ in range(max(1, math.ceil(need / n)))])[:need]


def _subject_order(groups: Sequence[int], epoch: int, seed: int, need: int) -> np.ndarray:
    rng = np.random.default_rng([seed, epoch, 1])
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(int(group), []).append(index)
    names = sorted(members)
    subjects = np.concatenate([rng.permutation(len(names)) for _ in range(max(1, math.ceil(need / len(names))))])
    cycles = {g: rng.permutation(members[g]) for g in names}
    taken = dict.fromkeys(names, 0)
    order = np.empty(need, dtype=np.int64)
    for i, s in enumerate(subjects[:need]):
        g = names[int(s)]
        if taken[g] == len(cycles[g]):  # every slice of this subject drawn: a new cycle
            cycles[g], taken[g] = rng.permutation(members[g]), 0
        order[i] = cycles[g][taken[g]]
        taken[g] += 1
    return order


def epoch_order(groups: Sequence[int], epoch: int, seed: int, rank: int, world: int, steps: int, batch: int,
                sampling: Sampling = Sampling.SLICES) -> list[int]:
    """Indices into the training samples for this rank and epoch: ``steps * batch`` of them.

    *groups* holds each sample's subject (any integer label); :attr:`Sampling.SLICES` ignores it."""
    if not groups:
        raise ValueError("epoch_order: no training samples")
    need = steps * batch * world
    if sampling is Sampling.SUBJECTS:
        idx = _subject_order(groups, epoch, seed, need)
    else:
        idx = _slice_order(len(groups), epoch, seed, need)
    return [int(i) for i in idx[rank::world]]
