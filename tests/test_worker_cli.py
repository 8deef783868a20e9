"""``dicomnode worker``: one synthesis worker of its own, e.g. one per GPU on another machine."""

from __future__ import annotations

import subprocess
from pathlib import Path

from nodeproc import DICOMNODE, node_sections
from workerproc import WorkerProcess


def sections(folder: Path, device: str) -> dict[str, dict[str, object]]:
    out = node_sections(folder, 11112)
    out["model"] = {"device": device, "batch_size": 4}
    return out


def test_device_flag_overrides_the_config_files_device(tmp_path: Path) -> None:
    """The config says cuda:0 (there is no GPU here): with --device cpu the worker loads its models on the CPU."""
    w = WorkerProcess(tmp_path / "w", sections(tmp_path, "cuda:0"), extra=("--device", "cpu")).start()
    try:
        w.wait_polling()
        loaded = [line for line in w.log().splitlines() if "loaded in" in line]
        assert loaded and all(line.endswith("device cpu") for line in loaded), w.log()
    finally:
        assert w.stop() == 0


def test_a_bad_device_flag_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    w = WorkerProcess(tmp_path / "w", sections(tmp_path, "cpu"))
    res = subprocess.run([*DICOMNODE, "worker", "--config", str(w.config), "--device", "gpu7"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == \
        "dicomnode: worker --device: expected auto, cpu, cuda or cuda:N, got 'gpu7'"


def test_the_reference_deployments_config_is_valid() -> None:
    """deploy/compose-config.toml (mounted by deploy/compose.yaml) parses, and points at the PostgreSQL ledger."""
    from dicom_node.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "deploy" / "compose-config.toml")
    assert cfg.storage.ledger_url.startswith("postgresql+psycopg://") and cfg.worker.processes == 0
    assert [d.host for d in cfg.destinations] == ["pacs"]
