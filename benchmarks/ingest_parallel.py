"""Parallel senders: aggregate ingest of ``dicomnode serve`` against Orthanc and dcmtk ``storescp --fork``.

The ``--senders`` mode of ``ingest.py``.  For every sender count S, S dcmtk ``storescu``
processes start at once, each over its own association with its own series (distinct SOP
Instance UIDs), to a fresh receiver (empty storage) of each kind in turn:

- ``dicomnode serve`` with ``[node] receivers = N`` for each N asked for (the key is written
  only when N != 1, so N = 1 runs on a node that predates the key);
- Orthanc (``tests/orthanc.py``'s server, its defaults otherwise);
- dcmtk ``storescp --fork`` (one child process per association; without ``--fork`` it serves
  one association at a time).

Aggregate instances/s = all instances / wall time from the start of the first sender to the end
of the last.  Every sender's exit status is checked and every instance must have arrived
(dicomnode: spool files and ledger rows; Orthanc: ``/statistics``; storescp: files), or the
run stops with an error.  The order of the receivers rotates from round to round; the table
gives medians.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dicomgen import SeriesSpec, make_series, write_series
from netutil import dcmtk, dcmtk_env, free_port, wait_for_port
from nodeproc import NodeProcess
from orthanc import ORTHANC_BIN, OrthancServer

#: the issue's targets at 4 senders (issue 11, section 5)
TARGET_SENDERS = 4
TARGET_VS_SINGLE = 1.6
TARGET_VS_ORTHANC = 1.0


class Running(Protocol):
    """A started receiver: where to send, and how many instances it holds."""

    port: int
    called_aet: str

    def received(self) -> int: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class Receiver:
    kind: str  # "dicomnode", "orthanc" or "storescp"
    receivers: int = 1  # dicomnode's [node] receivers

    @property
    def label(self) -> str:
        if self.kind == "dicomnode":
            return f"dicomnode receivers={self.receivers}"
        return "Orthanc" if self.kind == "orthanc" else "storescp --fork"

    def start(self, folder: Path, max_senders: int) -> Running:
        if self.kind == "dicomnode":
            return NodeReceiver(folder, self.receivers, max_senders)
        if self.kind == "orthanc":
            return OrthancReceiver(folder)
        return StorescpReceiver(folder)


def _end_group(pgid: int) -> None:
    """SIGKILL whatever is left of the process group we started (recorded id) after 5 s, and say so."""
    deadline = time.monotonic() + 5
    while True:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    print(f"# warning: processes of group {pgid} outlived their leader; killed", flush=True)
    os.killpg(pgid, signal.SIGKILL)


class NodeReceiver:
    called_aet = "DICOMNODE"

    def __init__(self, folder: Path, receivers: int, max_senders: int) -> None:
        node: dict[str, object] = {"max_associations": max(16, 2 * max_senders)}
        if receivers != 1:
            node["receivers"] = receivers
        # shipped defaults otherwise (HTTP listener on, INFO log); no series completes while measuring
        self.node = NodeProcess(folder, node=node, storage={"min_free_mb": 64},
                                series={"quiet_seconds": 3600.0, "complete_on_release": False})
        self.port = self.node.port
        self.node.start(timeout=120)  # serve listens once every receiver does; /healthz says how many
        code, body = self.node.http_get("/healthz")
        if f"{receivers}/{receivers} listening" not in body:
            print(f"# warning: not every receiver listens: /healthz {code} {body[:300]}", flush=True)

    def received(self) -> int:
        spool = self.node.storage / "spool"
        files = sum(1 for p in spool.glob("*/*/*.dcm"))
        with sqlite3.connect(f"file:{self.node.storage / 'ledger.db'}?mode=ro", uri=True) as db:
            rows = int(db.execute("SELECT count(*) FROM instances").fetchone()[0])
        if files != rows:
            raise RuntimeError(f"dicomnode: {files} files in the spool but {rows} ledger rows")
        return files

    def stop(self) -> None:
        proc = self.node.proc
        self.node.stop()
        if proc is not None:
            _end_group(proc.pid)


class OrthancReceiver:
    called_aet = "ORTHANC"

    def __init__(self, folder: Path) -> None:
        self.server = OrthancServer(folder)
        self.server.start()
        self.port = self.server.dicom_port

    def received(self) -> int:
        return int(self.server.statistics()["CountInstances"])

    def stop(self) -> None:
        self.server.stop()


class StorescpReceiver:
    called_aet = "DICOMNODE"

    def __init__(self, folder: Path) -> None:
        self.out = folder / "out"
        self.out.mkdir(parents=True)
        self.port = free_port()
        self.proc = subprocess.Popen([dcmtk("storescp"), "--fork", "--aetitle", self.called_aet, "--output-directory",
                                      str(self.out), str(self.port)], env=dcmtk_env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for_port(self.port, proc=self.proc, timeout=30)
        time.sleep(0.5)  # the probe's association times out in a child of its own

    def received(self) -> int:
        return sum(1 for p in self.out.rglob("*") if p.is_file())

    def children(self) -> list[str]:
        """storescp's children still running (it reaps the ended ones only when the next association comes)."""
        try:
            pids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return []
        live = []
        for pid in pids:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z":
                live.append(pid)
        return live

    def stop(self) -> None:
        deadline = time.monotonic() + 10
        while self.children() and time.monotonic() < deadline:  # each child ends with its association
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _end_group(self.proc.pid)


def generate_senders(work: Path, senders: int, instances: int) -> list[Path]:
    """One folder per sender, each its own series (own Study/Series/SOP Instance UIDs), kept between runs."""
    folders = []
    for i in range(senders):
        folder = work / f"parallel-{instances}" / f"sender{i + 1}"
        if not (folder.is_dir() and len(list(folder.glob("*.dcm"))) == instances):
            for old in folder.glob("*.dcm"):
                old.unlink()
            write_series(make_series(SeriesSpec(slices=instances, rows=256, cols=256, seed=100 + i,
                                                series_number=i + 1)), folder)
        folders.append(folder)
    return folders


def send_all(running: Running, folders: list[Path], logs: Path) -> float:
    """Start one storescu per folder at once; the wall time from the first start to the last exit."""
    logs.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    t0 = time.perf_counter()
    for i, folder in enumerate(folders):
        log = logs / f"storescu{i + 1}.log"
        with open(log, "wb") as out:
            procs.append((subprocess.Popen([dcmtk("storescu"), "-aet", "STORESCU", "-aec", running.called_aet,
                                            "--scan-directories", "127.0.0.1", str(running.port), str(folder)],
                                           env=dcmtk_env(), stdout=out, stderr=subprocess.STDOUT), log))
    codes = [p.wait(600) for p, _ in procs]
    dt = time.perf_counter() - t0
    failed = [(i + 1, c) for i, c in enumerate(codes) if c != 0]
    if failed:
        tail = procs[failed[0][0] - 1][1].read_text(errors="replace")[-1500:]
        raise RuntimeError(f"storescu exit status (sender, code): {failed}; sender {failed[0][0]}'s log:\n{tail}")
    return dt


def orthanc_setting(key: str) -> str:
    """The value of *key* Orthanc runs with here: tests/orthanc.py's config, else Orthanc's own default."""
    ours = OrthancServer(Path(tempfile.gettempdir())).config
    if key in ours:
        return str(ours[key]).lower()
    if ORTHANC_BIN is None:
        return "unknown"
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp) / "default.json"
        subprocess.run([ORTHANC_BIN, f"--config={sample}"], capture_output=True, timeout=30)
        text = sample.read_text() if sample.exists() else ""
    m = re.search(rf'^\s*"{key}"\s*:\s*([^,\n]+)', text, re.MULTILINE)
    return m.group(1).strip() if m else "unknown"


def orthanc_version() -> str:
    if ORTHANC_BIN is None:
        return "Orthanc (not installed)"
    res = subprocess.run([ORTHANC_BIN, "--version"], capture_output=True, text=True, timeout=30)
    return res.stdout.splitlines()[0].strip() if res.stdout else "Orthanc"


def ratio_line(what: str, num: float | None, den: float | None, target: float) -> str:
    if num is None or den is None:
        return f"- {what}: not measured"
    r = num / den
    return f"- {what}: **{r:.2f}** (target >= {target:g}: {'met' if r >= target else 'not met'})"


def run_parallel(senders: list[int], receivers: list[int], rounds: int, instances: int, work: Path) -> int:
    folders = generate_senders(work, max(senders), instances)
    nbytes = sum(f.stat().st_size for f in folders[0].glob("*.dcm"))
    peers = [Receiver("dicomnode", n) for n in receivers] + [Receiver("orthanc"), Receiver("storescp")]
    if ORTHANC_BIN is None:
        print("# Orthanc is not installed: its row is left out")
        peers = [p for p in peers if p.kind != "orthanc"]
    print(f"# each sender: its own series of {instances} instances of 256x256x16 bit ({nbytes / 1e6:.1f} MB), one "
          f"dcmtk storescu over its own association; all S senders start at once; TCP_NODELAY=1 for dcmtk")
    print(f"# aggregate instances/s = S x {instances} / (first sender's start .. last sender's exit); a fresh "
          f"receiver (empty storage) for every send; {rounds} round(s), receiver order rotating; medians")
    print("# durability: dicomnode: temp file, fsync, atomic link into place, folder fsync and a ledger row "
          "(SQLite) before each success; HTTP listener on, INFO log (shipped defaults)")
    print(f"# durability: {orthanc_version()}: SyncStorageArea = {orthanc_setting('SyncStorageArea')} (fsync of "
          f"each stored file), index in SQLite; DicomThreadsCount = {orthanc_setting('DicomThreadsCount')}; "
          f"StorageCompression = {orthanc_setting('StorageCompression')}")
    print("# durability: dcmtk storescp --fork (one child per association; it serves one association at a time "
          "without --fork): writes each file, no fsync")
    times: dict[tuple[str, int], list[float]] = {}
    for r in range(rounds):
        order = peers[r % len(peers):] + peers[:r % len(peers)]
        for s in senders:
            for peer in order:
                folder = work / "parallel-run" / f"{peer.kind}{peer.receivers}"
                shutil.rmtree(folder, ignore_errors=True)
                running = peer.start(folder, max(senders))
                try:
                    dt = send_all(running, folders[:s], folder / "senders")
                    got = running.received()
                finally:
                    running.stop()
                if got != s * instances:
                    raise RuntimeError(f"{peer.label}, {s} senders: {got} instances arrived, {s * instances} sent")
                times.setdefault((peer.label, s), []).append(dt)
                print(f"round {r + 1} senders {s:2d} {peer.label:22s} {s * instances / dt:8.1f} inst/s "
                      f"({s * instances} instances, all arrived; load {os.getloadavg()[0]:.2f})", flush=True)
    rate = {k: k[1] * instances / statistics.median(v) for k, v in times.items()}
    print("\n| receiver | " + " | ".join(f"{s} sender{'s' if s != 1 else ''}" for s in senders) + " |")
    print("|---|" + "---|" * len(senders))
    for peer in peers:
        print(f"| {peer.label} | " + " | ".join(f"{rate[(peer.label, s)]:.0f}" for s in senders) + " |")
    print(f"\ninstances/s, median of {rounds}; ratios at {TARGET_SENDERS} senders:")
    single = rate.get(("dicomnode receivers=1", TARGET_SENDERS))
    orthanc = rate.get(("Orthanc", TARGET_SENDERS))
    for n in receivers:
        ours = rate.get((f"dicomnode receivers={n}", TARGET_SENDERS))
        if n != 1:
            print(ratio_line(f"dicomnode receivers={n} / dicomnode receivers=1", ours, single, TARGET_VS_SINGLE))
        print(ratio_line(f"dicomnode receivers={n} / Orthanc", ours, orthanc, TARGET_VS_ORTHANC))
    print(f"# load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0
