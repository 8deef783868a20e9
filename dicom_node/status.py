"""``dicomnode status`` tables (rich)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

_STYLE = {"failed": "red", "done": "green", "not_selected": "dim", "receiving": "cyan", "delivering": "yellow",
          "running": "yellow", "queued": "blue", "selected": "green", "superseded": "dim"}


def _t(ts: str | None) -> str:
    return "" if not ts else ts.replace("T", " ").rstrip("Z")[:19]


def _timings(t: dict[str, float]) -> str:
    order = ("waiting", "loading", "inference", "building", "sending")
    return " ".join(f"{k[:4]} {t[k]:.1f}s" for k in order if k in t)


def render(data: dict[str, list[dict[str, Any]]], console: Console | None = None) -> None:
    console = console or Console()
    if not console.is_terminal:
        console = Console(width=220)
    st = Table(title="Series", title_justify="left", expand=False)
    for col in ("state", "instances", "from", "received", "completed", "class", "reason / description", "series UID"):
        st.add_column(col, overflow="fold")
    for s in data["series"]:
        style = _STYLE.get(s["state"], "")
        st.add_row(f"[{style}]{s['state']}[/]" if style else s["state"], str(s["instances"]), s["calling_aet"],
                   _t(s["first_received_at"]), _t(s["completed_at"]), s["classification"] or "",
                   s["reason"] or s.get("description") or "", s["series_uid"])
    console.print(st)
    jt = Table(title="Jobs", title_justify="left", expand=False)
    for col in ("id", "state", "direction", "created", "finished", "stages", "error", "source series", "output series"):
        jt.add_column(col, overflow="fold")
    for j in data["jobs"]:
        style = _STYLE.get(j["state"], "")
        err = j["error"] or ""
        if j.get("deliveries") and j["state"] != "done":
            err = (err + " " if err else "") + "; ".join(f"{d}: {v}" for d, v in j["deliveries"].items())
        if j["state"] == "delivering" and j.get("next_attempt_at") and j["attempts"]:
            err = f"retry {j['attempts']} at {_t(j['next_attempt_at'])}: {err}"
        jt.add_row(str(j["id"]), f"[{style}]{j['state']}[/]" if style else j["state"], j["direction"],
                   _t(j["created_at"]), _t(j["finished_at"]), _timings(j.get("timings") or {}), err,
                   j["source_series_uid"], j["output_series_uid"] or "")
    console.print(jt)
    if data.get("rejections"):
        rt = Table(title="Rejected instances", title_justify="left")
        for col in ("at", "from", "status", "reason", "SOP instance UID"):
            rt.add_column(col, overflow="fold")
        for r in data["rejections"]:
            rt.add_row(_t(r["at"]), r["calling_aet"], r["status"], r["reason"], r["sop_instance_uid"] or "")
        console.print(rt)
