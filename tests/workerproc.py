"""``dicomnode worker`` processes of their own (as on other machines), each with its own config file."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from nodeproc import DICOMNODE, write_config


class WorkerProcess:
    """One ``dicomnode worker --config <folder>/config.toml``; its log is ``<folder>/worker.log``."""

    def __init__(self, folder: Path, sections: dict[str, dict[str, Any]],
                 destinations: list[dict[str, Any]] | None = None, extra: tuple[str, ...] = ()) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.config = write_config(folder, sections, destinations)
        self.log_path = folder / "worker.log"
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> "WorkerProcess":
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([*DICOMNODE, "worker", "--config", str(self.config), *self.extra], stdout=log,
                                     stderr=subprocess.STDOUT, cwd=self.folder, env=env, start_new_session=True)
        log.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_polling(self, timeout: float = 90) -> None:
        """Until its models are loaded and it polls the ledger."""
        deadline = time.monotonic() + timeout
        while "polling the ledger" not in self.log():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not polling after {timeout} s:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self) -> None:
        """SIGTERM without waiting (stop several at once, then :meth:`stop` each)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
