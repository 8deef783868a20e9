"""The configuration's schema: one frozen dataclass per TOML section, with the defaults.

Parsing and validation (:mod:`dicom_node.config.parse`) produce these; the
rest of the node only ever reads them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from dicom_node.config.rules import DEFAULT_RULES, SelectionRule
from vocab import Direction, QCAction

__all__ = ["Config", "ConfigError", "DeliveryConfig", "Destination", "HttpConfig", "ModelConfig", "NodeConfig",
           "OutputConfig", "QCConfig", "RetentionConfig", "SecurityConfig", "SeriesConfig", "StorageConfig",
           "TLSConfig", "WorkerConfig"]


class ConfigError(ValueError):
    """A configuration file or flag is invalid.  ``str(err)`` is one line."""


@dataclass(frozen=True)
class NodeConfig:
    ae_title: str = "DICOMNODE"
    host: str = "0.0.0.0"
    port: int = 11112
    max_associations: int = 10
    receivers: int = 1  # receiving processes sharing the listening socket
    max_pdu: int = 262144  # largest PDU we accept (bytes); 0 = unlimited
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_inflated_mb: int = 1024  # largest data set a Deflated transfer syntax may inflate to (MB)


@dataclass(frozen=True)
class TLSConfig:
    cert: Path
    key: Path
    ca: Path | None = None
    require_client_cert: bool = False


@dataclass(frozen=True)
class SecurityConfig:
    allowed_calling_aets: tuple[str, ...] = ()
    allow_any_calling_aet: bool = False
    tls: TLSConfig | None = None


@dataclass(frozen=True)
class StorageConfig:
    dir: Path = Path("var")
    ledger_url: str = "sqlite:///var/ledger.db"
    min_free_mb: int = 512
    overwrite_instances: bool = False  # a resend of a stored SOP Instance UID with other content: replace or refuse


@dataclass(frozen=True)
class SeriesConfig:
    quiet_seconds: float = 10.0
    complete_on_release: bool = True
    release_grace_seconds: float = 1.0
    min_slices: int = 8
    rules: tuple[SelectionRule, ...] = DEFAULT_RULES


@dataclass(frozen=True)
class ModelConfig:
    checkpoint: str = "default"  # "default" = the shipped models, or a directory / file
    t1_to_t2: str | None = None  # per-direction override (path to a checkpoint)
    t2_to_t1: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    engine: str = "auto"  # auto (ONNX Runtime on CPU, torch on CUDA) | torch | onnxruntime
    batch_size: int = 16
    directions: tuple[Direction, ...] = (Direction.T1_TO_T2, Direction.T2_TO_T1)


@dataclass(frozen=True)
class WorkerConfig:
    processes: int = 1
    lease_seconds: float = 300.0
    poll_seconds: float = 0.5
    model_retry_seconds: float = 60.0  # a model that failed to load is tried again this often


@dataclass(frozen=True)
class OutputConfig:
    series_number_offset: int = 1000
    series_description: str = "SYNTHETIC {target} (AI) from {source}"
    synthetic_data_flag: bool = True
    burn_in_label: bool = True  # draw "SYNTHETIC <contrast>" into the pixels (BurnedInAnnotation YES)
    uid_root: str | None = None  # None = highdicom's root; else your organisation's
    institution_name: str | None = None


@dataclass(frozen=True)
class QCConfig:
    """Quality control of every synthetic series (:mod:`dicom_node.qc_stage`) and what a warn/fail verdict does."""

    enabled: bool = True
    on_warn: QCAction = QCAction.SEND
    on_fail: QCAction = QCAction.HOLD
    flip_every: int = 6  # the flip check predicts every n-th slice twice: about 2/n of the network's cost
    # flip disagreement (relative) above which the verdict is warn / fail; unset: the model's own thresholds
    # (multiples of its flip disagreement on its training scans, ml.qc.flip_thresholds)
    flip_warn: float | None = None
    flip_fail: float | None = None


@dataclass(frozen=True)
class DeliveryConfig:
    """Retry schedule: wait initial, initial*factor, ... (at most max) between attempts, until the
    waits add up to ``max_retry_hours`` (or ``max_attempts`` attempts were made, when that is > 0)."""

    max_retry_hours: float = 24.0
    max_attempts: int = 0  # 0 = no limit by count; max_retry_hours decides
    backoff_initial_seconds: float = 10.0
    backoff_factor: float = 2.0
    backoff_max_seconds: float = 600.0
    timeout_seconds: float = 30.0
    calling_ae_title: str | None = None  # None = node.ae_title


@dataclass(frozen=True)
class RetentionConfig:
    """How long finished series are kept (days after their last job finished), and the disk high-water mark.

    Only series whose every job is done or superseded (or that were not selected) are ever removed.
    """

    spool_days: float = 7.0  # received instances
    output_days: float = 7.0  # built synthetic series (output/job-<id>/)
    ledger_days: float = 90.0  # the ledger rows of the series, its jobs and deliveries (>= both above)
    high_water_percent: float = 90.0  # disk used above this: prune the oldest finished series first; 0 = off
    min_free_mb: int = 0  # free disk below this: the same; 0 = off
    interval_minutes: float = 60.0  # serve prunes this often; 0 = only `dicomnode prune`


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP listener of ``serve``: ``/metrics`` (Prometheus) and ``/healthz``."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 11180  # 11112 (DICOM) + HTTP; not Orthanc's 8042 nor a common Prometheus exporter port


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int
    name: str = ""
    tls: TLSConfig | None = None
    directions: tuple[Direction, ...] = (Direction.T1_TO_T2, Direction.T2_TO_T1)

    @property
    def label(self) -> str:
        return self.name or f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    series: SeriesConfig = field(default_factory=SeriesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    qc: QCConfig = field(default_factory=QCConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    destinations: tuple[Destination, ...] = ()
    http: HttpConfig = field(default_factory=HttpConfig)
    source: Path | None = None  # the file this came from

    @property
    def spool_dir(self) -> Path:
        return self.storage.dir / "spool"

    @property
    def output_dir(self) -> Path:
        return self.storage.dir / "output"

    def summary(self) -> str:
        """One log line with the effective settings (no secrets)."""
        dests = ", ".join(d.label for d in self.destinations) or "none"
        r = self.retention
        aets = "any" if self.security.allow_any_calling_aet else ",".join(
            self.security.allowed_calling_aets
        )
        return (
            f"config={self.source} ae_title={self.node.ae_title} "
            f"listen={self.node.host}:{self.node.port} tls={'on' if self.security.tls else 'off'} "
            f"max_associations={self.node.max_associations} receivers={self.node.receivers} calling_aets={aets} "
            f"storage={self.storage.dir} ledger={_redact_url(self.storage.ledger_url)} "
            f"quiet_seconds={self.series.quiet_seconds} model={self.model.checkpoint} "
            f"device={self.model.device} engine={self.model.engine} "
            f"qc={'on' if self.qc.enabled else 'off'}(warn={self.qc.on_warn.value},fail={self.qc.on_fail.value}) "
            f"workers={self.worker.processes} destinations={dests} "
            f"retention=spool {r.spool_days:g}d/output {r.output_days:g}d/ledger {r.ledger_days:g}d "
            f"high_water={r.high_water_percent:g}% every {r.interval_minutes:g} min "
            f"http={f'{self.http.host}:{self.http.port}' if self.http.enabled else 'off'}"
        )

    def with_overrides(self, **sections: Mapping[str, Any]) -> "Config":
        """Apply command-line flags (already typed) on top of the file."""
        cfg = self
        for section, values in sections.items():
            vals = {k: v for k, v in values.items() if v is not None}
            if vals:
                cfg = replace(cfg, **{section: replace(getattr(cfg, section), **vals)})
        from dicom_node.config.parse import check_consistency  # parsing builds on the schema, not the reverse

        check_consistency(cfg, cfg.source or Path("<flags>"))
        return cfg


def _redact_url(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]+@", r"//\1:***@", url)
