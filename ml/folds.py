"""Subject-wise k-fold cross-validation splits.

Folds are made of *subjects*, never slices, and two studies of one patient
(folder names that differ only by a ``_study<N>`` suffix, e.g.
``openms_long_patient01_study1`` / ``_study2``) always fall into the same fold:
otherwise the held-out figures would measure memory of that patient's anatomy.
Population templates (folder names containing ``template``) are not subjects;
:func:`real_subjects` leaves them out.

The assignment is deterministic: groups are shuffled with a seeded generator
and dealt round-robin to the folds, so ``--folds K --seed S`` always makes the
same split on the same data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["Fold", "FoldError", "real_subjects", "subject_folds", "subject_group"]

_STUDY = re.compile(r"_study\d+$", re.IGNORECASE)


class FoldError(ValueError):
    """Folds cannot be made as asked; ``str(err)`` is one line."""


@dataclass(frozen=True)
class Fold:
    index: int  # 1-based
    train: tuple[str, ...]
    val: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"fold-{self.index}"


def subject_group(name: str) -> str:
    """The patient a subject folder belongs to (its name without a ``_study<N>`` suffix)."""
    return _STUDY.sub("", name)


def real_subjects(names: Sequence[str]) -> list[str]:
    """*names* without population templates."""
    return [n for n in names if "template" not in n.lower()]


def subject_folds(names: Sequence[str], k: int | None = None, seed: int = 0) -> list[Fold]:
    """*k* folds over the patients of *names* (``None``: leave one patient out)."""
    if len(set(names)) != len(names):
        raise FoldError("subject names are not unique")
    groups: dict[str, list[str]] = {}
    for n in sorted(names):
        groups.setdefault(subject_group(n), []).append(n)
    keys = sorted(groups)
    k = len(keys) if k is None else k
    if k < 2:
        raise FoldError(f"--folds: must be >= 2, got {k}")
    if k > len(keys):
        raise FoldError(f"--folds: {k} folds need at least {k} patients, the data has {len(keys)}")
    order = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    val_sets: list[list[str]] = [[] for _ in range(k)]
    for i, g in enumerate(order):
        val_sets[i % k].extend(groups[g])
    folds = []
    for i, val in enumerate(val_sets):
        held = set(val)
        folds.append(Fold(i + 1, tuple(n for n in sorted(names) if n not in held), tuple(sorted(val))))
    return folds
