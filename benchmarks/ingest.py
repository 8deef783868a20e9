#!/usr/bin/env python3
"""Ingest throughput of ``dicomnode serve`` against real peers, in one run.

A 500-instance 256x256 16-bit MR series is generated once, then sent with dcmtk
``storescu`` over one association to (a) ``dicomnode serve`` (durable: fsync +
rename + ledger row before each success), (b) dcmtk ``storescp``, (c)
pynetdicom's bundled ``storescp`` app, alternating ``--rounds`` times.  All
dcmtk tools run with ``TCP_NODELAY=1``; dicomnode sets TCP_NODELAY itself;
pynetdicom's app leaves Nagle's algorithm on (it has no option for it).

``--memory`` also sends a ~1 GB series (2000 instances of 512x512x16 bit) to
``dicomnode serve`` and reports the peak resident memory (VmHWM) of the serve
process.

``--stages`` also sends the series once more to a ``dicomnode serve`` whose
C-STORE handler stages are timed (``stage_timer.py``) and prints where each
instance's time goes.

``--senders 1,4,8`` measures parallel senders instead (``ingest_parallel.py``): S storescu
processes at once, each its own association and series, to ``dicomnode serve`` with
``[node] receivers = N`` for each N of ``--receivers``, Orthanc and dcmtk ``storescp --fork``;
aggregate instances/s, every instance checked to have arrived.

Usage: python benchmarks/ingest.py [--rounds 3] [--memory] [--stages]
       python benchmarks/ingest.py --senders 1,4,8 [--receivers 1,2] [--rounds 3] [--instances-per-sender 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from dicomgen import SeriesSpec, make_series, write_series  # noqa: E402
from netutil import dcmtk, dcmtk_env, free_port, wait_for_port  # noqa: E402
from nodeproc import toml_value  # noqa: E402


def generate(folder: Path, slices: int, size: int) -> tuple[list[Path], int]:
    if folder.is_dir() and len(list(folder.glob("*.dcm"))) == slices:
        files = sorted(folder.glob("*.dcm"))
    else:
        shutil.rmtree(folder, ignore_errors=True)
        files = []
        for start in range(0, slices, 100):  # in chunks: bounded memory for the 1 GB series
            chunk = make_series(SeriesSpec(slices=min(100, slices - start), rows=size, cols=size, seed=start))
            files += write_series(chunk, folder)
    return files, sum(f.stat().st_size for f in files)


def node_config(folder: Path, port: int) -> Path:
    cfg: dict[str, dict[str, object]] = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port},
        "security": {"allowed_calling_aets": ["STORESCU"]},
        "storage": {"dir": str(folder / "var"), "min_free_mb": 64},
        "series": {"quiet_seconds": 3600.0, "complete_on_release": False},
        "worker": {"processes": 0},
        "http": {"enabled": False},  # measured as before the listener existed
    }
    text = "\n".join(f"[{s}]\n" + "\n".join(f"{k} = {toml_value(v)}" for k, v in vals.items()) for s, vals in cfg.items())
    path = folder / "config.toml"
    path.write_text(text + "\n")
    return path


class Peer:
    def __init__(self, name: str, work: Path) -> None:
        self.name = name
        self.work = work
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        out = self.work / "out"
        out.mkdir()
        env = dcmtk_env()
        if self.name == "dicomnode":
            cmd = [sys.executable, "-m", "dicom_node.cli", "--log-level", "WARNING", "serve", "--config",
                   str(node_config(self.work, self.port))]
        elif self.name == "dicomnode, stages timed":
            cmd = [sys.executable, str(REPO / "benchmarks" / "stage_timer.py"), str(self.work / "stages.json"), "--",
                   "--log-level", "WARNING", "serve", "--config", str(node_config(self.work, self.port))]
        elif self.name == "dcmtk storescp":
            cmd = [dcmtk("storescp"), "--aetitle", "DICOMNODE", "--output-directory", str(out), str(self.port)]
        else:
            cmd = [sys.executable, "-m", "pynetdicom", "storescp", str(self.port), "--ae-title", "DICOMNODE",
                   "--output-directory", str(out)]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.work)
        wait_for_port(self.port, proc=self.proc, timeout=60)
        time.sleep(1.0 if self.name.startswith("dicomnode") else 0.5)  # let a raw TCP probe's association time out cleanly

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def send(port: int, folder: Path) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "DICOMNODE", "--scan-directories",
                          "127.0.0.1", str(port), str(folder)], env=dcmtk_env(), capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"storescu failed: {res.stderr[-1000:]}")
    return dt


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fsync_floor_ms(folder: Path, size: int, n: int = 200) -> float:
    """The durability cost alone on this disk: write + fsync + rename + folder fsync per instance."""
    folder.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    t0 = time.perf_counter()
    for i in range(n):
        tmp, final = folder / f"{i}.part", folder / f"{i}.dcm"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, final)
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
    return (time.perf_counter() - t0) / n * 1000


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{socket.gethostname()}: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def counts(text: str) -> list[int]:
    """``1,4,8`` -> [1, 4, 8] (positive integers)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"not a list of positive integers: {text!r}")
    return values


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--memory", action="store_true", help="also measure serve's peak memory on a ~1 GB series")
    ap.add_argument("--stages", action="store_true", help="also time each stage of dicomnode's C-STORE handler")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dicomnode-bench")
    ap.add_argument("--senders", type=counts, help="parallel mode: sender counts, e.g. 1,4,8")
    ap.add_argument("--receivers", type=counts, default=[1],
                    help="parallel mode: dicomnode's [node] receivers values, e.g. 1,2 (default 1)")
    ap.add_argument("--instances-per-sender", type=int, default=200, help="parallel mode: each sender's series")
    args = ap.parse_args()
    if shutil.which(dcmtk("storescu")) is None:
        print("dcmtk is not installed (apt-get install dcmtk)", file=sys.stderr)
        return 2
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.senders:
        from ingest_parallel import run_parallel

        print(f"# {machine()}")
        print(f"# load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
        return run_parallel(args.senders, args.receivers, args.rounds, args.instances_per_sender, work)
    files, nbytes = generate(work / "series500", args.instances, 256)
    print(f"# {machine()}")
    print(f"# series: {len(files)} instances of 256x256x16 bit, {nbytes / 1e6:.1f} MB; one association per send")
    print("# TCP_NODELAY=1 for storescu and storescp; dicomnode sets TCP_NODELAY; pynetdicom's app leaves Nagle on")
    peers = ["dicomnode", "dcmtk storescp", "pynetdicom storescp"]
    times: dict[str, list[float]] = {p: [] for p in peers}
    for r in range(args.rounds):
        for name in peers:
            peer = Peer(name, work / name.replace(" ", "_"))
            peer.start()
            try:
                dt = send(peer.port, work / "series500")
            finally:
                peer.stop()
            times[name].append(dt)
            print(f"round {r + 1} {name:20s} {len(files) / dt:8.1f} inst/s {nbytes / 1e6 / dt:7.1f} MB/s", flush=True)
    med = {p: statistics.median(t) for p, t in times.items()}
    print("\n| receiver | instances/s (median) | MB/s | ratio dicomnode / receiver |")
    print("|---|---|---|---|")
    for p in peers:
        print(f"| {p} | {len(files) / med[p]:.0f} | {nbytes / 1e6 / med[p]:.1f} | {med[p] / med['dicomnode']:.2f} |"
              if p != "dicomnode" else f"| {p} | {len(files) / med[p]:.0f} | {nbytes / 1e6 / med[p]:.1f} | 1.00 |")
    # ratio = throughput(dicomnode) / throughput(peer) = time(peer) / time(dicomnode)
    floor = fsync_floor_ms(work / "fsync_floor", nbytes // len(files))
    print(f"\ndurability floor on this disk: {floor:.2f} ms per instance (write, fsync, rename, folder fsync) "
          f"= at most {1000 / floor:.0f} instances/s over one association, before any DICOM work")
    if args.stages:
        peer = Peer("dicomnode, stages timed", work / "dicomnode_stages")
        peer.start()
        try:
            dt = send(peer.port, work / "series500")
        finally:
            peer.stop()
        stages = json.loads((peer.work / "stages.json").read_text())
        print(f"\ndicomnode with its stages timed: {len(files) / dt:.0f} inst/s; per instance, in ms:")
        print("| stage | median | mean |\n|---|---|---|")
        for stage, ms in stages.items():
            print(f"| {stage} | {statistics.median(ms):.2f} | {statistics.mean(ms):.2f} |")
    if args.memory:
        big, big_bytes = generate(work / "series1g", 2000, 512)
        peer = Peer("dicomnode", work / "dicomnode_mem")
        peer.start()
        try:
            dt = send(peer.port, work / "series1g")
            hwm = vm_hwm_mb(peer.proc.pid)  # type: ignore[union-attr]
        finally:
            peer.stop()
        print(f"\npeak RSS (VmHWM) of dicomnode serve while receiving {len(big)} instances, {big_bytes / 1e9:.2f} GB "
              f"in {dt:.1f} s ({big_bytes / 1e6 / dt:.0f} MB/s): {hwm:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
