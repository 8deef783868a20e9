"""``dicomnode status`` tables (rich), readable at 100 columns.

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

_STYLE = {"failed": "red", "done": "green", "not_selected": "dim", "receiving": "cyan", "delivering": "yellow",
          "retrying": "yellow", "running": "yellow", "queued": "blue", "selected": "green", "superseded": "dim"}
STAGES = ("waiting", "loading", "inference", "building", "sending")
DEFAULT_WIDTH = 100  # when the output is not a terminal and COLUMNS is not set


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
    return "retrying" if j.get("retrying") else j["state"]


def job_detail(j: dict[str, Any]) -> str:
    """What an operator needs to know about a job that is not done, in one paragraph."""
    parts: list[str] = []
    if j.get("retrying"):
        parts.append(f"retrying (next attempt at {_t(j.get('next_attempt_at'))} UTC, {j['attempts']} failed so far)")
    if j.get("error"):
        parts.append(j["error"])
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
                    ("source series", fixed), ("output series", fixed), ("stages", {"min_width": 15}),
                    ("delivered", {"ratio": 1})):
        jt.add_column(col, overflow="fold", **kw)
    details: list[tuple[int, str]] = []
    for j in data["jobs"]:
        delivered = "\n".join(f"{d}: {v}" for d, v in (j.get("deliveries") or {}).items())
        jt.add_row(str(j["id"]), _state(job_state(j)), j["direction"], short_uid(j["source_series_uid"]),
                   short_uid(j["output_series_uid"]), _timings(j.get("timings") or {}), escape(delivered))
        if j["state"] != "done" and job_detail(j):
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
