"""The delivery retry schedule: exponential backoff, capped, for a bounded time.

With the defaults (10 s, doubling, at most 10 min, for 24 h) a destination
that is down is tried again after 10, 20, 40, ... 320 s and then every 10
minutes; the job fails only when the waits add up to 24 hours.  A PACS that
comes back is therefore delivered to at most ``backoff_max_seconds`` later.
"""

from __future__ import annotations

from dataclasses import dataclass

from dicom_node.config import DeliveryConfig

__all__ = ["RetryPolicy"]


@dataclass(frozen=True)
class RetryPolicy:
    initial: float
    factor: float
    maximum: float
    window_seconds: float
    max_attempts: int = 0  # 0 = no limit by count

    @classmethod
    def from_config(cls, cfg: DeliveryConfig) -> "RetryPolicy":
        return cls(cfg.backoff_initial_seconds, cfg.backoff_factor, cfg.backoff_max_seconds,
                   cfg.max_retry_hours * 3600.0, cfg.max_attempts)

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait after the ``failed_attempts``-th failed attempt (counting from 1)."""
        n = max(0, failed_attempts - 1)
        if self.factor > 1 and n > 64:  # far past the cap; avoid float overflow
            return self.maximum
        return min(self.maximum, self.initial * self.factor ** n)

    def waited(self, failed_attempts: int) -> float:
        """Seconds of scheduled waiting between the first attempt and attempt number ``failed_attempts``."""
        total = 0.0
        for i in range(1, failed_attempts):
            d = self.delay(i)
            if d >= self.maximum:  # the rest are all at the cap
                return total + d * (failed_attempts - i)
            total += d
        return total

    def gives_up(self, failed_attempts: int) -> bool:
        """True when no further attempt follows ``failed_attempts`` failed ones."""
        if self.max_attempts and failed_attempts >= self.max_attempts:
            return True
        return self.waited(failed_attempts) >= self.window_seconds

    def describe(self) -> str:
        limit = f", at most {self.max_attempts} attempts" if self.max_attempts else ""
        return (f"retry after {self.initial:g} s, x{self.factor:g} each time, at most {self.maximum:g} s apart, "
                f"for {self.window_seconds / 3600:g} h{limit}")
