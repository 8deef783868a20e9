"""A small tmpfs mounted for one test: a disk of known size that can be filled or made read-only (needs root)."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest


@contextmanager
def mounted_tmpfs(folder: Path, size_mb: int) -> Iterator[Path]:
    """Mount a tmpfs of *size_mb* at *folder* (made if missing) and unmount it afterwards; skip where it cannot be
    mounted, with the reason."""
    folder.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({(res.stderr or res.stdout).strip()}); needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
