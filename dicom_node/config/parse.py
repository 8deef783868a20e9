"""Reading and validating config.toml into a :class:`~dicom_node.config.schema.Config`.

The TOML file is parsed once and every key is checked against the schema.
Any problem raises :class:`ConfigError` whose message names the file, the key
and what is wrong, so the CLI can print one line and exit with status 2.
"""

from __future__ import annotations

import enum
import re
import tomllib
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Mapping, TypeVar, cast

from dicom_node.config.rules import SelectionRule
from dicom_node.config.schema import (Config, ConfigError, DeliveryConfig, Destination, HttpConfig, ModelConfig,
                                      NodeConfig, OutputConfig, QCConfig, RetentionConfig, SecurityConfig,
                                      SeriesConfig, StorageConfig, TLSConfig, WorkerConfig)
from vocab import Classification, Direction, QCAction

__all__ = ["check_consistency", "load_config", "parse_config"]

_T = TypeVar("_T")
_N = TypeVar("_N", int, float)

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII, no backslash


# --------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------


class _Ctx:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {key}: {problem}")


def _typed(ctx: _Ctx, key: str, value: Any, kind: type[_T]) -> _T:
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ctx.fail(key, f"expected a number, got {value!r}")
        return cast(_T, float(value))
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.fail(key, f"expected an integer, got {value!r}")
        return cast(_T, value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ctx.fail(key, f"expected true or false, got {value!r}")
        return cast(_T, value)
    if kind is str:
        if not isinstance(value, str):
            raise ctx.fail(key, f"expected a string, got {value!r}")
        return cast(_T, value)
    raise AssertionError(kind)


def _table(ctx: _Ctx, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ctx.fail(key, f"expected a table, got {value!r}")
    return value


def _unknown(ctx: _Ctx, prefix: str, table: Mapping[str, Any], known: set[str]) -> None:
    for k in table:
        if k not in known:
            raise ctx.fail(f"{prefix}.{k}" if prefix else k, f"unknown key (known: {', '.join(sorted(known))})")


def _ae(ctx: _Ctx, key: str, value: Any) -> str:
    v = _typed(ctx, key, value, str).strip()
    if not _AE_RE.match(v):
        raise ctx.fail(key, f"not a valid AE title (1-16 printable ASCII characters, no backslash): {value!r}")
    return v


def _port(ctx: _Ctx, key: str, value: Any) -> int:
    v = _typed(ctx, key, value, int)
    if not 0 <= v <= 65535:
        raise ctx.fail(key, f"port must be 0-65535, got {v}")
    return v


def _positive(ctx: _Ctx, key: str, value: Any, kind: type[_N], allow_zero: bool = False) -> _N:
    v = _typed(ctx, key, value, kind)
    if v < 0 or (v == 0 and not allow_zero):
        raise ctx.fail(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {v}")
    return v


#: more receiving processes than this buy nothing: each one is a whole Python process with its own AE
MAX_RECEIVERS = 32


def _receivers(ctx: _Ctx, key: str, value: Any) -> int:
    v = _positive(ctx, key, value, int)
    if v > MAX_RECEIVERS:
        raise ctx.fail(key, f"must be at most {MAX_RECEIVERS}, got {v}")
    return v


def _at_least(ctx: _Ctx, key: str, value: Any, minimum: float) -> float:
    v = _typed(ctx, key, value, float)
    if v < minimum:
        raise ctx.fail(key, f"must be >= {minimum:g}, got {v:g}")
    return v


def _path(ctx: _Ctx, key: str, value: Any, base: Path) -> Path:
    p = Path(_typed(ctx, key, value, str)).expanduser()
    return p if p.is_absolute() else (base / p)


def _range(ctx: _Ctx, key: str, value: Any) -> tuple[float, float]:
    if not (isinstance(value, list) and len(value) == 2):
        raise ctx.fail(key, f"expected [min, max], got {value!r}")
    lo, hi = (_typed(ctx, key, v, float) for v in value)
    if lo > hi:
        raise ctx.fail(key, f"min {lo} is greater than max {hi}")
    return (lo, hi)


def _regex(ctx: _Ctx, key: str, value: Any) -> str:
    v = _typed(ctx, key, value, str)
    try:
        re.compile(v)
    except re.error as exc:
        raise ctx.fail(key, f"invalid regular expression: {exc}") from None
    return v


def _engine(ctx: _Ctx, key: str, value: Any) -> str:
    allowed = ("auto", "torch", "onnxruntime")
    if not isinstance(value, str) or value.lower() not in allowed:
        raise ctx.fail(key, f"expected one of {', '.join(allowed)}, got {value!r}")
    return value.lower()


def _enum(ctx: _Ctx, key: str, value: Any, enum_cls: type[enum.Enum]) -> Any:
    allowed = [m.value for m in enum_cls]
    if value not in allowed:
        raise ctx.fail(key, f"expected one of {', '.join(map(str, allowed))}, got {value!r}")
    return enum_cls(value)


def _directions(ctx: _Ctx, key: str, value: Any) -> tuple[Direction, ...]:
    if not isinstance(value, list) or not value:
        raise ctx.fail(key, f"expected a non-empty list of directions, got {value!r}")
    return tuple(_enum(ctx, key, v, Direction) for v in value)


def _tls(ctx: _Ctx, key: str, value: Any, base: Path) -> TLSConfig:
    t = _table(ctx, key, value)
    _unknown(ctx, key, t, {"cert", "key", "ca", "require_client_cert"})
    for req in ("cert", "key"):
        if req not in t:
            raise ctx.fail(f"{key}.{req}", "required when TLS is configured")
    tls = TLSConfig(
        cert=_path(ctx, f"{key}.cert", t["cert"], base),
        key=_path(ctx, f"{key}.key", t["key"], base),
        ca=_path(ctx, f"{key}.ca", t["ca"], base) if "ca" in t else None,
        require_client_cert=_typed(ctx, f"{key}.require_client_cert", t.get("require_client_cert", False), bool),
    )
    for name in ("cert", "key", "ca"):
        p = getattr(tls, name)
        if p is not None and not p.is_file():
            raise ctx.fail(f"{key}.{name}", f"file not found: {p}")
    if tls.require_client_cert and tls.ca is None:
        raise ctx.fail(f"{key}.ca", "required when require_client_cert = true")
    return tls


def _simple_section(ctx: _Ctx, name: str, raw: Any, cls: type, specials: Mapping[str, Any] | None = None) -> Any:
    """Parse a flat section whose fields are str/int/float/bool."""
    table = _table(ctx, f"[{name}]", raw)
    specials = dict(specials or {})
    kinds = {f.name: f.type for f in fields(cls)}
    _unknown(ctx, name, table, set(kinds))
    values: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{name}.{k}"
        if k in specials:
            values[k] = specials[k](key, v)
            continue
        kind = str(kinds[k])
        if kind in ("float",):
            values[k] = _positive(ctx, key, v, float, allow_zero=True)
        elif kind in ("int",):
            values[k] = _positive(ctx, key, v, int, allow_zero=True)
        elif kind == "bool":
            values[k] = _typed(ctx, key, v, bool)
        else:
            values[k] = _typed(ctx, key, v, str)
    return cls(**values)


def _rule(ctx: _Ctx, idx: int, raw: Any) -> SelectionRule:
    key = f"series.rules[{idx}]"
    t = _table(ctx, key, raw)
    known = {f.name for f in fields(SelectionRule)}
    _unknown(ctx, key, t, known)
    if "classify" not in t:
        raise ctx.fail(f"{key}.classify", "required (T1, T2 or not_eligible)")
    seq = t.get("scanning_sequence", [])
    if not isinstance(seq, list) or not all(isinstance(s, str) for s in seq):
        raise ctx.fail(f"{key}.scanning_sequence", f"expected a list of strings, got {seq!r}")
    return SelectionRule(
        name=_typed(ctx, f"{key}.name", t.get("name", f"rule-{idx}"), str),
        classify=_enum(ctx, f"{key}.classify", t["classify"], Classification),
        description=_regex(ctx, f"{key}.description", t["description"]) if "description" in t else None,
        exclude_description=(
            _regex(ctx, f"{key}.exclude_description", t["exclude_description"]) if "exclude_description" in t else None
        ),
        repetition_time_ms=_range(ctx, f"{key}.repetition_time_ms", t["repetition_time_ms"])
        if "repetition_time_ms" in t
        else None,
        echo_time_ms=_range(ctx, f"{key}.echo_time_ms", t["echo_time_ms"]) if "echo_time_ms" in t else None,
        inversion_time_ms=_range(ctx, f"{key}.inversion_time_ms", t["inversion_time_ms"])
        if "inversion_time_ms" in t
        else None,
        scanning_sequence=tuple(s.upper() for s in seq),
    )


def parse_config(data: Mapping[str, Any], path: Path) -> Config:
    """Validate a parsed TOML document into a :class:`Config`."""
    ctx = _Ctx(path)
    base = path.parent.resolve()
    known = {"node", "security", "storage", "series", "model", "worker", "output", "qc", "delivery", "destinations",
             "retention", "http"}
    _unknown(ctx, "", data, known)

    node = _simple_section(
        ctx,
        "node",
        data.get("node", {}),
        NodeConfig,
        {
            "ae_title": lambda k, v: _ae(ctx, k, v),
            "port": lambda k, v: _port(ctx, k, v),
            "max_associations": lambda k, v: _positive(ctx, k, v, int),
            "receivers": lambda k, v: _receivers(ctx, k, v),
            "max_inflated_mb": lambda k, v: _positive(ctx, k, v, int),
        },
    )

    sec_raw = _table(ctx, "[security]", data.get("security", {}))
    _unknown(ctx, "security", sec_raw, {"allowed_calling_aets", "allow_any_calling_aet", "tls"})
    aets_raw = sec_raw.get("allowed_calling_aets", [])
    if not isinstance(aets_raw, list):
        raise ctx.fail("security.allowed_calling_aets", f"expected a list of AE titles, got {aets_raw!r}")
    security = SecurityConfig(
        allowed_calling_aets=tuple(_ae(ctx, "security.allowed_calling_aets", a) for a in aets_raw),
        allow_any_calling_aet=_typed(
            ctx, "security.allow_any_calling_aet", sec_raw.get("allow_any_calling_aet", False), bool
        ),
        tls=_tls(ctx, "security.tls", sec_raw["tls"], base) if "tls" in sec_raw else None,
    )

    storage_raw = _table(ctx, "[storage]", data.get("storage", {}))
    storage = _simple_section(
        ctx,
        "storage",
        storage_raw,
        StorageConfig,
        {
            "dir": lambda k, v: _path(ctx, k, v, base),
            "ledger_url": lambda k, v: _ledger_url(ctx, k, v, base),
        },
    )
    if "ledger_url" not in storage_raw:
        storage = replace(storage, ledger_url=f"sqlite:///{storage.dir / 'ledger.db'}")

    series_raw = dict(_table(ctx, "[series]", data.get("series", {})))
    rules_raw = series_raw.pop("rules", None)
    series = _simple_section(
        ctx, "series", series_raw, SeriesConfig, {"min_slices": lambda k, v: _positive(ctx, k, v, int)}
    )
    if rules_raw is not None:
        if not isinstance(rules_raw, list) or not rules_raw:
            raise ctx.fail("series.rules", "expected a non-empty array of tables [[series.rules]]")
        series = replace(series, rules=tuple(_rule(ctx, i, r) for i, r in enumerate(rules_raw)))

    model = _simple_section(
        ctx,
        "model",
        data.get("model", {}),
        ModelConfig,
        {
            "device": lambda k, v: _device(ctx, k, v),
            "engine": lambda k, v: _engine(ctx, k, v),
            "batch_size": lambda k, v: _positive(ctx, k, v, int),
            "directions": lambda k, v: _directions(ctx, k, v),
            "checkpoint": lambda k, v: _checkpoint(ctx, k, v, base),
            "t1_to_t2": lambda k, v: _checkpoint(ctx, k, v, base),
            "t2_to_t1": lambda k, v: _checkpoint(ctx, k, v, base),
        },
    )
    worker = _simple_section(
        ctx, "worker", data.get("worker", {}), WorkerConfig,
        {"processes": lambda k, v: _positive(ctx, k, v, int, True),
         "model_retry_seconds": lambda k, v: _positive(ctx, k, v, float)}
    )
    output = _simple_section(
        ctx,
        "output",
        data.get("output", {}),
        OutputConfig,
        {
            "uid_root": lambda k, v: _uid_root(ctx, k, v),
            "series_description": lambda k, v: _template(ctx, k, v),
        },
    )
    qc = _simple_section(
        ctx,
        "qc",
        data.get("qc", {}),
        QCConfig,
        {
            "on_warn": lambda k, v: _enum(ctx, k, v, QCAction),
            "on_fail": lambda k, v: _enum(ctx, k, v, QCAction),
            "flip_every": lambda k, v: _positive(ctx, k, v, int),
            "flip_warn": lambda k, v: _positive(ctx, k, v, float),
            "flip_fail": lambda k, v: _positive(ctx, k, v, float),
        },
    )
    if qc.flip_fail is not None and qc.flip_warn is not None and qc.flip_fail < qc.flip_warn:
        raise ctx.fail("qc.flip_fail", f"must be >= flip_warn ({qc.flip_warn:g}), got {qc.flip_fail:g}")
    delivery = _simple_section(
        ctx,
        "delivery",
        data.get("delivery", {}),
        DeliveryConfig,
        {
            "max_attempts": lambda k, v: _positive(ctx, k, v, int, allow_zero=True),
            "max_retry_hours": lambda k, v: _positive(ctx, k, v, float),
            "backoff_initial_seconds": lambda k, v: _positive(ctx, k, v, float),
            "backoff_max_seconds": lambda k, v: _positive(ctx, k, v, float),
            "backoff_factor": lambda k, v: _at_least(ctx, k, v, 1.0),
            "calling_ae_title": lambda k, v: _ae(ctx, k, v),
        },
    )
    if delivery.backoff_max_seconds < delivery.backoff_initial_seconds:
        raise ctx.fail("delivery.backoff_max_seconds",
                       f"must be >= backoff_initial_seconds ({delivery.backoff_initial_seconds:g}), "
                       f"got {delivery.backoff_max_seconds:g}")

    retention = _retention(ctx, data.get("retention", {}))

    dests_raw = data.get("destinations", [])
    if not isinstance(dests_raw, list):
        raise ctx.fail("destinations", "expected an array of tables [[destinations]]")
    destinations = tuple(_destination(ctx, i, d, base) for i, d in enumerate(dests_raw))

    http = _simple_section(ctx, "http", data.get("http", {}), HttpConfig,
                           {"port": lambda k, v: _port(ctx, k, v), "host": lambda k, v: _host(ctx, k, v)})

    cfg = Config(
        node=node,
        security=security,
        storage=storage,
        series=series,
        model=model,
        worker=worker,
        output=output,
        qc=qc,
        delivery=delivery,
        retention=retention,
        destinations=destinations,
        http=http,
        source=path,
    )
    check_consistency(cfg, path)
    return cfg


def _retention(ctx: _Ctx, raw: Any) -> RetentionConfig:
    r: RetentionConfig = _simple_section(ctx, "retention", raw, RetentionConfig)
    if r.high_water_percent > 100:
        raise ctx.fail("retention.high_water_percent", f"must be 0-100, got {r.high_water_percent:g}")
    for key in ("spool_days", "output_days"):
        if r.ledger_days < getattr(r, key):
            raise ctx.fail("retention.ledger_days", f"must be >= {key} ({getattr(r, key):g}): the ledger says what "
                           f"was removed, so it is kept longest; got {r.ledger_days:g}")
    return r


def check_consistency(cfg: Config, path: Path) -> None:
    ctx = _Ctx(path)
    if not cfg.security.allowed_calling_aets and not cfg.security.allow_any_calling_aet:
        raise ctx.fail(
            "security.allowed_calling_aets",
            "empty: list the AE titles allowed to send, or set allow_any_calling_aet = true",
        )
    if cfg.http.enabled and cfg.http.port and cfg.http.port == cfg.node.port:
        raise ctx.fail("http.port", f"is node.port ({cfg.node.port}) too: DICOM and HTTP need a port each")
    names = [d.label for d in cfg.destinations]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ctx.fail("destinations", f"duplicate destination {sorted(dupes)[0]}")


def _ledger_url(ctx: _Ctx, key: str, value: Any, base: Path) -> str:
    url = _typed(ctx, key, value, str)
    if "://" not in url:
        raise ctx.fail(key, f"not a database URL (e.g. sqlite:///var/ledger.db): {url!r}")
    # sqlite:///relative/path -> relative to the config file's folder
    m = re.match(r"^(sqlite(?:\+\w+)?):///(?!/)(.+)$", url)
    if m and m.group(2) != ":memory:":
        return f"{m.group(1)}:///{base / m.group(2)}"
    return url


def _host(ctx: _Ctx, key: str, value: Any) -> str:
    v = _typed(ctx, key, value, str).strip()
    if not v or any(c.isspace() for c in v):
        raise ctx.fail(key, f"expected a host name or address, got {value!r}")
    return v


#: model.device (and ``dicomnode worker --device``)
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def _device(ctx: _Ctx, key: str, value: Any) -> str:
    v = _typed(ctx, key, value, str)
    if not DEVICE_RE.match(v):
        raise ctx.fail(key, f"expected {DEVICE_CHOICES}, got {v!r}")
    return v


def _checkpoint(ctx: _Ctx, key: str, value: Any, base: Path) -> str:
    v = _typed(ctx, key, value, str)
    if v == "default":
        return v
    p = _path(ctx, key, v, base)
    if not p.exists():
        raise ctx.fail(key, f"checkpoint not found: {p}")
    return str(p)


def _uid_root(ctx: _Ctx, key: str, value: Any) -> str:
    v = _typed(ctx, key, value, str)
    if not re.match(r"^[1-9][0-9]*(\.(0|[1-9][0-9]*))*\.$", v) or len(v) > 40:
        raise ctx.fail(key, f"a UID root is digits and dots, ending in a dot, at most 40 characters: {v!r}")
    return v


def _template(ctx: _Ctx, key: str, value: Any) -> str:
    v = _typed(ctx, key, value, str)
    try:
        v.format(target="T2", source="T1 SE", direction="t1-to-t2", model="m")
    except (KeyError, IndexError, ValueError) as exc:
        raise ctx.fail(key, f"bad template (placeholders: {{target}} {{source}} {{direction}} {{model}}): {exc}") from None
    return v


def _destination(ctx: _Ctx, idx: int, raw: Any, base: Path) -> Destination:
    key = f"destinations[{idx}]"
    t = _table(ctx, key, raw)
    _unknown(ctx, key, t, {"name", "ae_title", "host", "port", "tls", "directions"})
    for req in ("ae_title", "host", "port"):
        if req not in t:
            raise ctx.fail(f"{key}.{req}", "required")
    return Destination(
        name=_typed(ctx, f"{key}.name", t.get("name", ""), str),
        ae_title=_ae(ctx, f"{key}.ae_title", t["ae_title"]),
        host=_typed(ctx, f"{key}.host", t["host"], str),
        port=_port(ctx, f"{key}.port", t["port"]),
        tls=_tls(ctx, f"{key}.tls", t["tls"], base) if "tls" in t else None,
        directions=_directions(ctx, f"{key}.directions", t["directions"])
        if "directions" in t
        else (Direction.T1_TO_T2, Direction.T2_TO_T1),
    )


def load_config(path: Path | str) -> Config:
    """Read and validate *path*.  Raises :class:`ConfigError` on any problem."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return parse_config(data, p)
