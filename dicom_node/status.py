"""``dicomnode status``: the ledger's read models as JSON (``--json``) and as tables (rich), readable at 100 columns.

UIDs are shortened to their last 12 characters (``--json`` has them in full);
long reasons and errors are printed below the tables, one paragraph per job.
"""

from __future__ import annotations

import os
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from storage.ledger import JobRunView, JobView, NoteView, QCView, RejectionView, SeriesView, StatusView, iso
from vocab import RETRYING

_STYLE = {"failed": "red", "done": "green", "not_selected": "dim", "receiving": "cyan", "delivering": "yellow",
          "retrying": "yellow", "running": "yellow", "queued": "blue", "selected": "green", "superseded": "dim",
          "held": "magenta", "pass": "green", "warn": "yellow", "fail": "red"}
STAGES = ("waiting", "loading", "inference", "qc", "building", "sending")
DEFAULT_WIDTH = 100  # when the output is not a terminal and COLUMNS is not set


def series_json(s: SeriesView, study_date: str | None) -> dict[str, Any]:
    return {
        "study_uid": s.study_uid, "series_uid": s.series_uid, "state": s.state, "instances": s.instances,
        "calling_aet": s.calling_aet, "modality": s.modality, "description": s.description,
        "classification": s.classification, "reason": s.reason, "generation": s.generation,
        "first_received_at": iso(s.first_received_at), "last_received_at": iso(s.last_received_at),
        "completed_at": iso(s.completed_at), "study_date": study_date,
    }


def _run_json(r: JobRunView) -> dict[str, Any]:
    return {"state": r.state, "error": r.error, "attempts": r.attempts, "started_at": iso(r.started_at),
            "finished_at": iso(r.finished_at), "timings": dict(r.timings)}


def qc_json(q: QCView | None) -> dict[str, Any] | None:
    """A job's quality control: ``{"verdict", "reasons", "checks", ...}``, or None when none ran."""
    if q is None:
        return None
    return {"verdict": q.verdict, "reasons": list(q.reasons), "checks": dict(q.checks),
            "model_identity": q.model_identity, "at": iso(q.created_at), "released_at": iso(q.released_at)}


def job_json(j: JobView) -> dict[str, Any]:
    return {
        "id": j.id, "state": j.state, "direction": j.direction, "source_series_uid": j.source_series_uid,
        "output_series_uid": j.output_series_uid, "output_instances": j.output_instances, "error": j.error,
        "attempts": j.attempts, "worker": j.worker, "created_at": iso(j.created_at),
        "started_at": iso(j.started_at), "finished_at": iso(j.finished_at),
        "next_attempt_at": iso(j.next_attempt_at), "retrying": j.retrying, "timings": dict(j.timings),
        "deliveries": {d: f"{c.stored}/{c.total} stored" for d, c in j.deliveries.items()},
        "previous_runs": [_run_json(r) for r in j.previous_runs], "qc": qc_json(j.qc),
    }


def rejection_json(r: RejectionView) -> dict[str, Any]:
    if r.kind == "association":
        return {"kind": r.kind, "at": iso(r.at), "calling_aet": r.calling_aet, "called_aet": r.called_aet,
                "peer": r.peer, "status": r.result, "reason": r.reason, "sop_instance_uid": None}
    return {"kind": r.kind, "at": iso(r.at), "calling_aet": r.calling_aet, "sop_instance_uid": r.sop_instance_uid,
            "status": None if r.status is None else f"0x{r.status:04X}", "reason": r.reason}


def _note_json(n: NoteView) -> dict[str, Any]:
    return {"at": iso(n.at), "calling_aet": n.calling_aet, "series_uid": n.series_uid,
            "sop_instance_uid": n.sop_instance_uid, "text": n.text}


def status_json(view: StatusView, study_dates: dict[str, str | None] | None = None) -> dict[str, list[dict[str, Any]]]:
    """What ``status --json`` prints (*study_dates*: per series UID, read from the spool by the CLI)."""
    dates = study_dates or {}
    return {"series": [series_json(s, dates.get(s.series_uid)) for s in view.series],
            "jobs": [job_json(j) for j in view.jobs],
            "rejections": [rejection_json(r) for r in view.rejections],
            "notes": [_note_json(n) for n in view.notes]}


def short_uid(uid: str | None, keep: int = 12) -> str:
    if not uid:
        return ""
    return uid if len(uid) <= keep + 1 else "…" + uid[-keep:]


def _t(ts: str | None) -> str:
    return "" if not ts else ts.replace("T", " ").rstrip("Z")[:19]


def _short_t(ts: str | None) -> str:
    """MM-DD HH:MM:SS (UTC)."""
    return _t(ts)[5:]


def _date(d: str | None) -> str:
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if d and len(d) == 8 and d.isdigit() else (d or "")


def _timings(t: dict[str, float]) -> str:
    return "\n".join(f"{k} {t[k]:.1f} s" for k in STAGES if k in t)


def _state(state: str) -> str:
    style = _STYLE.get(state, "")
    return f"[{style}]{state}[/]" if style else state


def job_state(j: dict[str, Any]) -> str:
    """``retrying`` for a job waiting for its next delivery attempt, else its state."""
    return RETRYING if j.get("retrying") else j["state"]


def job_detail(j: dict[str, Any]) -> str:
    """What an operator needs to know about a job that is not done, in one paragraph."""
    parts: list[str] = []
    if j.get("retrying"):
        parts.append(f"retrying (next attempt at {_t(j.get('next_attempt_at'))} UTC, {j['attempts']} failed so far)")
    if j.get("error"):
        parts.append(j["error"])
    qc = j.get("qc") or {}
    if j["state"] == "held":
        parts.append(f"held by QC ({qc.get('verdict', '?')}); `dicomnode release {j['id']}` sends it")
    if qc.get("verdict") not in (None, "pass"):
        parts.append(f"QC {qc['verdict']}: " + ("; ".join(qc.get("reasons") or []) or "no reason given"))
    return ": ".join(parts)


def console_for_output() -> Console:
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=DEFAULT_WIDTH)
    return console


def render(data: dict[str, list[dict[str, Any]]], console: Console | None = None) -> None:
    console = console or console_for_output()
    st = Table(title="Series", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    fixed: dict[str, Any] = {"no_wrap": True}
    for col, kw in (("state", fixed), ("n", {"justify": "right", **fixed}), ("from", {}), ("study date", fixed),
                    ("mod", fixed), ("description / reason", {"ratio": 1}), ("received UTC", fixed),
                    ("series", fixed)):
        st.add_column(col, overflow="fold", **kw)
    for s in data["series"]:
        text = escape(s.get("description") or "")
        if s.get("reason"):
            text += ("\n" if text else "") + f"[dim]{escape(s['reason'])}[/]"
        st.add_row(_state(s["state"]), str(s["instances"]), escape(s["calling_aet"] or ""),
                   _date(s.get("study_date")), s.get("modality") or "", text, _short_t(s["first_received_at"]),
                   short_uid(s["series_uid"]))
    console.print(st)

    jt = Table(title="Jobs", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col, kw in (("id", {"justify": "right", **fixed}), ("state", fixed), ("direction", fixed),
                    ("source series", fixed), ("output series", fixed), ("qc", fixed), ("stages", {"min_width": 15}),
                    ("delivered", {"ratio": 1})):
        jt.add_column(col, overflow="fold", **kw)
    details: list[tuple[int, str]] = []
    for j in data["jobs"]:
        delivered = "\n".join(f"{d}: {v}" for d, v in (j.get("deliveries") or {}).items())
        verdict = (j.get("qc") or {}).get("verdict", "")
        jt.add_row(str(j["id"]), _state(job_state(j)), j["direction"], short_uid(j["source_series_uid"]),
                   short_uid(j["output_series_uid"]), _state(verdict) if verdict else "",
                   _timings(j.get("timings") or {}), escape(delivered))
        if (j["state"] != "done" or verdict not in ("", "pass")) and job_detail(j):
            details.append((j["id"], job_detail(j)))
    console.print(jt)
    for jid, text in details:
        console.print(f"job {jid}: {escape(text)}", soft_wrap=False, overflow="fold")
    if details:
        console.print()

    if data.get("rejections"):
        rt = Table(title="Rejected", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for col, kw in (("at UTC", fixed), ("what", fixed), ("calling", {}), ("called", {}), ("peer", {}),
                        ("status", fixed), ("reason", {"ratio": 1}), ("SOP instance", fixed)):
            rt.add_column(col, overflow="fold", **kw)
        for r in data["rejections"]:
            rt.add_row(_short_t(r["at"]), r.get("kind", "instance"), escape(r.get("calling_aet") or ""),
                       escape(r.get("called_aet") or ""), r.get("peer") or "", r.get("status") or "",
                       escape(r["reason"]), short_uid(r.get("sop_instance_uid")))
        console.print(rt)
