"""Contrasts: what a series is (its classification) and which way a model translates (its direction)."""

from __future__ import annotations

import enum

__all__ = ["DIRECTIONS", "Classification", "Direction"]


class Classification(str, enum.Enum):
    """Outcome of series selection."""

    T1 = "T1"
    T2 = "T2"
    NOT_ELIGIBLE = "not_eligible"


class Direction(str, enum.Enum):
    """Which way a model translates contrast."""

    T1_TO_T2 = "t1-to-t2"
    T2_TO_T1 = "t2-to-t1"

    @property
    def source(self) -> Classification:
        return Classification.T1 if self is Direction.T1_TO_T2 else Classification.T2

    @property
    def target(self) -> Classification:
        return Classification.T2 if self is Direction.T1_TO_T2 else Classification.T1

    @classmethod
    def for_source(cls, source: Classification) -> Direction:
        if source is Classification.T1:
            return cls.T1_TO_T2
        if source is Classification.T2:
            return cls.T2_TO_T1
        raise ValueError(f"no synthesis direction for a {source.value} series")


#: every direction's value, in order (the strings checkpoints and command lines use)
DIRECTIONS: tuple[str, ...] = tuple(d.value for d in Direction)
