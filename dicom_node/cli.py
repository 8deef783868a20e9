"""The ``dicomnode`` command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click

from dicom_node import __version__
from dicom_node.cli_errors import UsageFailure
from dicom_node.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from storage.ledger import Ledger

log = logging.getLogger("dicom_node")


def _one_line(exc: BaseException) -> str:
    """The driver's message without SQLAlchemy's statement dump and links."""
    orig = getattr(exc, "orig", None)
    return str(orig or exc).splitlines()[0] if str(orig or exc) else type(exc).__name__


def _open_ledger(cfg: Config, *, read_only: bool = False) -> "Ledger":
    """The ledger of *cfg*, or one line and exit 2 when it cannot be opened (missing, newer, unreachable)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from storage.db import LedgerError
    from storage.ledger import Ledger

    try:
        return Ledger(cfg.storage.ledger_url, read_only=read_only)
    except LedgerError as exc:
        raise UsageFailure(str(exc)) from None
    except (SQLAlchemyError, OSError) as exc:
        where = make_url(cfg.storage.ledger_url).render_as_string(hide_password=True).removeprefix("sqlite:///")
        raise UsageFailure(f"cannot {'read' if read_only else 'open'} the ledger at {where}: {_one_line(exc)}") from None


def _study_date(path: Path) -> str | None:
    """StudyDate of a spooled instance (read from its header; the ledger keeps no patient or study dates)."""
    import pydicom

    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyDate"]).get("StudyDate", "")) or None
    except Exception:  # noqa: BLE001 - a file gone or unreadable just leaves the column empty
        return None


def _valid_state(value: str | None) -> str | None:
    from vocab import STATUS_FILTERS

    if value is not None and value not in STATUS_FILTERS:
        raise UsageFailure(f"status --state: unknown state {value!r} (valid: {', '.join(STATUS_FILTERS)})")
    return value


def config_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=Path("config.toml"),
        show_default=True, help="Configuration file (TOML).",
    )(f)


def read_config(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dicomnode")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def cli(log_level: str) -> None:
    """DICOM node: receives MR series and sends back synthetic T2 (or T1) series."""
    from dicom_node.logsetup import configure

    configure(log_level)


@cli.command()
@config_option
@click.option("--host", default=None, help="Listen address (overrides node.host).")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="Listen port (overrides node.port).")
@click.option("--ae-title", default=None, help="Our AE title (overrides node.ae_title).")
@click.option("--workers", type=click.IntRange(0), default=None, help="Worker processes (overrides worker.processes).")
def serve(config_path: Path, host: str | None, port: int | None, ae_title: str | None, workers: int | None) -> None:
    """Receive DICOM (C-ECHO, C-STORE) and synthesize complete series."""
    from dicom_node.serve import serve as run_serve

    cfg = read_config(config_path)
    try:
        cfg = cfg.with_overrides(node={"host": host, "port": port, "ae_title": ae_title},
                                 worker={"processes": workers})
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None
    from dicom_node.web.listener import ListenError
    from storage.db import LedgerError

    try:
        code = run_serve(cfg)
    except LedgerError as exc:
        raise UsageFailure(f"cannot start: ledger: {exc}") from None
    except ListenError as exc:
        raise UsageFailure(f"cannot start: {exc}") from None
    except OSError as exc:
        raise UsageFailure(f"cannot start: {exc.strerror or exc} ({cfg.node.host}:{cfg.node.port})") from None
    sys.exit(code)


def _valid_device(value: str | None) -> str | None:
    from dicom_node.config.parse import DEVICE_CHOICES, DEVICE_RE

    if value is not None and not DEVICE_RE.match(value):
        raise UsageFailure(f"worker --device: expected {DEVICE_CHOICES}, got {value!r}")
    return value


@cli.command()
@config_option
@click.option("--device", default=None, callback=lambda _c, _p, v: _valid_device(v),
              help="Inference device: auto, cpu, cuda or cuda:N (overrides model.device; one worker per GPU).")
def worker(config_path: Path, device: str | None) -> None:
    """Run one synthesis worker against the shared ledger and spool (e.g. on another machine)."""
    from dicom_node.worker import run_worker

    from storage.db import LedgerError

    cfg = read_config(config_path)
    try:
        cfg = cfg.with_overrides(model={"device": device})
    except ConfigError as exc:
        raise UsageFailure(str(exc)) from None
    try:
        code = run_worker(cfg)
    except LedgerError as exc:
        raise UsageFailure(f"cannot start: ledger: {exc}") from None
    sys.exit(code)


@cli.command()
@config_option
@click.option("--state", default=None, callback=lambda _c, _p, v: _valid_state(v),
              help="Only series/jobs in this state: receiving, selected, not_selected, queued, running, delivering, "
                   "retrying, held, done, failed, superseded.")
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_path: Path, state: str | None, limit: int, as_json: bool) -> None:
    """Show series and jobs, newest first (reads the ledger; works while serve runs)."""
    from sqlalchemy.exc import SQLAlchemyError

    from dicom_node.status import render, status_json

    cfg = read_config(config_path)
    where = cfg.storage.ledger_url.removeprefix("sqlite:///")
    ledger = _open_ledger(cfg, read_only=True)
    try:
        view = ledger.status(state=state, limit=limit)
        firsts = ledger.first_instance_paths([x.series_uid for x in view.series])
    except (SQLAlchemyError, OSError) as exc:
        raise UsageFailure(f"cannot read the ledger at {where}: {_one_line(exc)}") from None
    finally:
        ledger.close()
    data = status_json(view, {uid: _study_date(cfg.spool_dir / rel) for uid, rel in firsts.items()})
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        render(data)


@cli.command()
@config_option
@click.argument("job_id", type=int, required=False)
@click.option("--all-failed", is_flag=True, help="Retry every failed job.")
@click.option("--force", is_flag=True, help="Also retry a job that is done (sends every instance again).")
def retry(config_path: Path, job_id: int | None, all_failed: bool, force: bool) -> None:
    """Start a new run of a failed (or held) job: re-send its built output if it is intact, else synthesize again.

    Only instances a destination has not confirmed are sent again.
    """
    from storage.outputs import OutputDamaged, check_output

    if (job_id is None) == (not all_failed):
        raise UsageFailure("retry: give a JOB id or --all-failed (not both)")
    cfg = read_config(config_path)
    ledger = _open_ledger(cfg)
    try:
        ids = ledger.failed_job_ids() if all_failed else [job_id]
        if not ids:
            click.echo("no failed jobs")
            return
        for jid in ids:
            assert jid is not None
            job = ledger.job(jid)
            if job is None:
                raise UsageFailure(f"no job {jid}")
            try:
                check_output(job.output_dir, job.output_instances, job.output_series_uid)
                resend, why = True, ""
            except OutputDamaged as exc:
                resend, why = False, str(exc)
            try:
                out = ledger.retry_job(jid, resend=resend, force=force)
            except (KeyError, ValueError) as exc:
                raise UsageFailure(str(exc).strip("'\"")) from None
            was = f"was {out.previous_state}" + (f" after {job.attempts} delivery attempt(s)" if job.attempts else "")
            if resend:
                kept = ", ".join(f"{n} already stored at {d}" for d, n in sorted(out.already_stored.items()))
                click.echo(f"job {jid} re-queued ({was}): re-sending the built output "
                           f"({job.output_instances} instances{'; ' + kept + ', not sent again' if kept else ''})")
            else:
                click.echo(f"job {jid} re-queued ({was}): will be synthesized again ({why})")
    finally:
        ledger.close()


@cli.command()
@config_option
@click.option("--dry-run", is_flag=True, help="Only say what would be removed (the ledger is opened read-only).")
def prune(config_path: Path, dry_run: bool) -> None:
    """Remove what [retention] allows: spool and outputs of settled series past their age (or oldest first above
    the disk high-water mark), then their ledger rows.  One line per class (counts and sizes); exit 0."""
    from sqlalchemy.exc import SQLAlchemyError

    from dicom_node.prune import Pruner
    from storage.spool import Spool

    cfg = read_config(config_path)
    ledger = _open_ledger(cfg, read_only=dry_run)
    try:
        pruner = Pruner(cfg.retention, ledger, Spool(cfg.spool_dir, create=not dry_run), cfg.output_dir,
                        cfg.storage.dir)
        report = pruner.run(dry_run=dry_run)
    except (SQLAlchemyError, OSError) as exc:
        raise UsageFailure(f"prune failed: {_one_line(exc)}") from None
    finally:
        ledger.close()
    for line in report.lines(cfg.retention):
        click.echo(line)


@cli.command()
@config_option
@click.argument("job_id", type=int)
def release(config_path: Path, job_id: int) -> None:
    """Send a job that quality control held (state held): a worker delivers its built output."""
    cfg = read_config(config_path)
    ledger = _open_ledger(cfg)
    try:
        try:
            ledger.release_job(job_id)
        except (KeyError, ValueError) as exc:
            raise UsageFailure(str(exc).strip("'\"")) from None
        job = ledger.job(job_id)
        n = job.output_instances if job else 0
        click.echo(f"job {job_id} released: its built output ({n} instances) is sent to its destinations")
    finally:
        ledger.close()


@cli.command()
@config_option
@click.argument("destination", required=False)
@click.option("--timeout", type=click.FloatRange(0.1), default=10.0, show_default=True, help="Seconds per destination.")
def echo(config_path: Path, destination: str | None, timeout: float) -> None:
    """C-ECHO every configured destination (or the one named): one line each; exit 1 if any does not answer."""
    from dicom_node.net.echo import echo as c_echo

    cfg = read_config(config_path)
    dests = list(cfg.destinations)
    if not dests:
        raise UsageFailure(f"{config_path}: no [[destinations]] configured")
    if destination is not None:
        dests = [d for d in dests if destination in (d.label, d.name, d.ae_title)]
        if not dests:
            known = ", ".join(d.label for d in cfg.destinations)
            raise UsageFailure(f"no destination {destination!r} in {config_path} (configured: {known})")
    calling = cfg.delivery.calling_ae_title or cfg.node.ae_title
    failed = 0
    for d in dests:
        r = c_echo(d, calling_ae_title=calling, timeout=timeout)
        failed += not r.ok
        where = f"{d.ae_title}@{d.host}:{d.port}{' (TLS)' if d.tls else ''}"
        click.echo(f"{d.label}: {where}: {'ok' if r.ok else 'FAILED'}: {r.answer} ({r.seconds:.2f} s)")
    sys.exit(1 if failed else 0)


@cli.command()
@config_option
def migrate(config_path: Path) -> None:
    """Create the ledger or bring its schema up to date (serve and worker also do it when they start)."""
    from sqlalchemy.engine import make_url

    from storage.db import LedgerError, make_engine
    from storage.db import migrate as run_migrations

    cfg = read_config(config_path)
    shown = make_url(cfg.storage.ledger_url).render_as_string(hide_password=True)
    try:
        engine = make_engine(cfg.storage.ledger_url)
    except Exception as exc:  # a malformed URL, a missing database driver
        raise UsageFailure(f"ledger {shown}: {_one_line(exc)}") from None
    try:
        change = run_migrations(engine)
    except LedgerError as exc:
        raise UsageFailure(f"ledger {shown}: {exc}") from None
    except Exception as exc:  # e.g. the database server cannot be reached
        raise UsageFailure(f"ledger {shown}: {_one_line(exc)}") from None
    finally:
        engine.dispose()
    if change.before is None:
        click.echo(f"ledger {shown}: created (schema v{change.after})")
    elif change.before == change.after:
        click.echo(f"ledger {shown}: schema v{change.after}, up to date")
    else:
        click.echo(f"ledger {shown}: migrated from schema v{change.before} to v{change.after}")


def _register_ml_commands() -> None:
    from dicom_node.cli_ml import COMMANDS

    for c in COMMANDS:
        cli.add_command(c)


_register_ml_commands()


def main() -> None:
    cli(prog_name="dicomnode")


if __name__ == "__main__":
    main()
