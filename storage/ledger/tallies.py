"""Tallies for monitoring: counts by state, rejections, deliveries and stage durations, read from the ledger.

Every process that writes the ledger (receivers, workers on any machine)
counts here, so ``/metrics`` can report what the whole node did.  Read-only,
a handful of grouped queries; stage durations are one streamed pass over the
timings of finished job runs (memory stays constant, whatever the history).
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from sqlalchemy import Text, case, func, select, type_coerce, union_all

from storage.ledger.base import LedgerBase
from storage.models import Delivery, Instance, Job, JobRun, Meta, Rejection, Series
from vocab import JobState, SeriesState

__all__ = ["DeliveryTally", "DurationTally", "LedgerTallies", "Tallies", "FINISHED_JOB_STATES"]

#: a job in one of these states has ended its run: its timings no longer change
FINISHED_JOB_STATES: tuple[str, ...] = (JobState.DONE.value, JobState.FAILED.value, JobState.SUPERSEDED.value)

_ROWS_PER_FETCH = 1000


@dataclass(frozen=True)
class DeliveryTally:
    """One destination: C-STORE attempts of synthetic instances, and how many it has confirmed stored."""

    attempts: int
    stored: int

    @property
    def failures(self) -> int:
        """Attempts that did not end with the instance stored."""
        return max(0, self.attempts - self.stored)


@dataclass(frozen=True)
class DurationTally:
    """A histogram of one stage's durations: ``counts[i]`` observations <= ``bounds[i]`` (not cumulative),
    the last entry those above every bound."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    total: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, observations <= it) as Prometheus buckets, ending with ``+Inf``."""
        out: list[tuple[str, int]] = []
        n = 0
        for bound, c in zip(self.bounds, self.counts):
            n += c
            out.append((repr(float(bound)), n))
        out.append(("+Inf", self.count))
        return out


@dataclass(frozen=True)
class LedgerTallies:
    series: dict[str, int]  # every series state, 0 when none
    jobs: dict[str, int]  # every job state, 0 when none
    instances: int  # instances recorded (every receiver)
    rejected_instances: dict[int, int]  # by the C-STORE status we answered
    deliveries: dict[str, DeliveryTally]  # by destination label
    stages: dict[str, DurationTally]  # by stage name (finished runs only)


def histogram(values: Iterable[tuple[str, float]], stages: Sequence[str],
              bounds: Sequence[float]) -> dict[str, DurationTally]:
    """Bucket (stage, seconds) observations; stages not in *stages* are left out."""
    return _Buckets(stages, bounds).add_pairs(values).tallies()


class _Buckets:
    """Per-stage bucket counts, filled from timings dicts (or their JSON text) as fast as Python allows."""

    def __init__(self, stages: Sequence[str], bounds: Sequence[float]) -> None:
        self.stages = tuple(stages)
        self.bounds = tuple(bounds)
        self.index = {s: i for i, s in enumerate(self.stages)}
        self.counts = [[0] * (len(self.bounds) + 1) for _ in self.stages]
        self.totals = [0.0] * len(self.stages)

    def add_pairs(self, values: Iterable[tuple[str, float]]) -> "_Buckets":
        self.add_timings([{stage: secs} for stage, secs in values])
        return self

    def add_timings(self, rows: Iterable[Any]) -> "_Buckets":
        """*rows*: timings dicts, their JSON text, or 1-tuples of either (as a result set yields them)."""
        index, counts, totals, bounds = self.index, self.counts, self.totals, self.bounds
        loads, place = json.loads, bisect.bisect_left
        for row in rows:
            timings = row[0] if type(row) is not dict and not isinstance(row, (str, bytes)) else row
            if isinstance(timings, (str, bytes)):
                try:
                    timings = loads(timings)
                except ValueError:
                    continue
            if type(timings) is not dict:
                continue
            for stage, secs in timings.items():
                i = index.get(stage)
                if i is None or type(secs) not in (float, int) or secs < 0:
                    continue
                counts[i][place(bounds, secs)] += 1
                totals[i] += secs
        return self

    def tallies(self) -> dict[str, DurationTally]:
        return {s: DurationTally(self.bounds, tuple(self.counts[i]), self.totals[i]) for i, s in enumerate(self.stages)}


class Tallies(LedgerBase):
    def ping(self) -> None:
        """Read one row (raises if the ledger cannot be read): the health check's probe."""
        with self.session() as s:
            s.execute(select(Meta.key).limit(1)).all()

    def tallies(self, stages: Sequence[str], bounds: Sequence[float]) -> LedgerTallies:
        """What ``/metrics`` reports from the ledger (see :class:`LedgerTallies`).

        Stage durations come from finished runs only (jobs done, failed or
        superseded, and earlier runs kept by ``dicomnode retry``): a run's
        timings are final then, so every bucket only ever grows.
        """
        with self.session() as s:
            series = {st.value: 0 for st in SeriesState}
            series.update({str(k): int(n) for k, n in s.execute(
                select(Series.state, func.count()).group_by(Series.state))})
            jobs = {st.value: 0 for st in JobState}
            jobs.update({str(k): int(n) for k, n in s.execute(select(Job.state, func.count()).group_by(Job.state))})
            instances = int(s.scalar(select(func.count()).select_from(Instance)) or 0)
            rejected = {int(k): int(n) for k, n in s.execute(
                select(Rejection.status, func.count()).group_by(Rejection.status))}
            deliveries = {
                str(dest): DeliveryTally(int(attempts or 0), int(stored or 0))
                for dest, attempts, stored in s.execute(
                    select(Delivery.destination, func.sum(Delivery.attempts),
                           func.sum(case((Delivery.stored.is_(True), 1), else_=0))).group_by(Delivery.destination))
            }
            # the stored JSON text, without the JSON type's per-row processing, streamed in batches
            parts = [select(type_coerce(Job.timings, Text)).where(Job.state.in_(FINISHED_JOB_STATES))]
            if self.has_table("job_runs"):
                parts.append(select(type_coerce(JobRun.timings, Text)))
            stmt = union_all(*parts) if len(parts) > 1 else parts[0]
            rows = s.execute(stmt, execution_options={"yield_per": _ROWS_PER_FETCH})
            durations = _Buckets(stages, bounds).add_timings(rows).tallies()
        return LedgerTallies(series, jobs, instances, rejected, deliveries, durations)

