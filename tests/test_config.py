"""Configuration: every problem stops with exit code 2 and one line naming file, key and problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.config import Classification, ConfigError, Direction, load_config
from vocab import QCAction

REPO = Path(__file__).resolve().parents[1]
GOOD = """
[node]
ae_title = "NODE1"
port = 11112
[security]
allowed_calling_aets = ["PACS"]
[storage]
dir = "data"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_shipped_config_is_valid_and_documented() -> None:
    cfg = load_config(REPO / "config.toml")
    assert cfg.node.ae_title == "DICOMNODE" and cfg.node.port == 11112 and cfg.node.max_associations == 10
    assert cfg.storage.dir == REPO / "var"
    assert cfg.storage.ledger_url == f"sqlite:///{REPO / 'var' / 'ledger.db'}"
    assert cfg.series.quiet_seconds == 10 and cfg.model.checkpoint == "default" and cfg.model.device == "auto"
    assert [(d.ae_title, d.host, d.port) for d in cfg.destinations] == [("PACS", "127.0.0.1", 4242)]
    readme = (REPO / "README.md").read_text()
    assert cfg.qc.enabled and cfg.qc.on_warn is QCAction.SEND and cfg.qc.on_fail is QCAction.HOLD
    for section in ("node", "security", "storage", "series", "model", "worker", "output", "qc", "delivery",
                    "destinations", "retention"):
        for key in _keys_of(section):
            assert f"`{key}`" in readme, f"README does not document {section}.{key}"


def _keys_of(section: str) -> list[str]:
    from dataclasses import fields

    from dicom_node import config as c

    cls = {"node": c.NodeConfig, "security": c.SecurityConfig, "storage": c.StorageConfig, "series": c.SeriesConfig,
           "model": c.ModelConfig, "worker": c.WorkerConfig, "output": c.OutputConfig, "qc": c.QCConfig,
           "delivery": c.DeliveryConfig, "destinations": c.Destination, "retention": c.RetentionConfig}[section]
    return [f.name for f in fields(cls)]


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.storage.dir == tmp_path.resolve() / "data"
    assert cfg.storage.ledger_url == f"sqlite:///{tmp_path.resolve() / 'data' / 'ledger.db'}"
    assert cfg.security.allowed_calling_aets == ("PACS",)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (GOOD + "\n[node2]\nx = 1\n", "node2: unknown key"),
        (GOOD.replace("port = 11112", "prot = 11112"), "node.prot: unknown key"),
        (GOOD.replace("port = 11112", 'port = "11112"'), "node.port: expected an integer"),
        (GOOD.replace("port = 11112", "port = 70000"), "node.port: port must be 0-65535"),
        (GOOD.replace('"NODE1"', '"THIS_AE_TITLE_IS_TOO_LONG"'), "node.ae_title: not a valid AE title"),
        (GOOD.replace('["PACS"]', "[]"), "security.allowed_calling_aets: empty"),
        (GOOD + "\n[series]\nquiet_seconds = -1\n", "series.quiet_seconds: must be >= 0"),
        (GOOD + "\n[model]\ndevice = \"tpu\"\n", "model.device: expected auto, cpu, cuda"),
        (GOOD + "\n[model]\ncheckpoint = \"nope/x\"\n", "model.checkpoint: checkpoint not found"),
        (GOOD + "\n[[destinations]]\nae_title = \"PACS\"\nhost = \"h\"\n", "destinations[0].port: required"),
        (GOOD + "\n[[destinations]]\nae_title=\"P\"\nhost=\"h\"\nport=1\ndirections=[\"t1-t2\"]\n",
         "destinations[0].directions: expected one of t1-to-t2, t2-to-t1"),
        (GOOD + "\n[[series.rules]]\nclassify = \"T3\"\n", "series.rules[0].classify: expected one of T1, T2, not_eligible"),
        (GOOD + "\n[[series.rules]]\nclassify = \"T1\"\ndescription = \"(\"\n", "series.rules[0].description: invalid regular"),
        (GOOD + "\n[security.tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n", "security.tls.cert: file not found"),
        (GOOD + "\n[output]\nuid_root = \"1.2.x.\"\n", "output.uid_root"),
        (GOOD + "\n[retention]\nspool_days = 120\n", "retention.ledger_days: must be >= spool_days (120)"),
        (GOOD + "\n[retention]\nhigh_water_percent = 120\n", "retention.high_water_percent: must be 0-100"),
        (GOOD + "\n[retention]\noutput_days = -1\n", "retention.output_days: must be >= 0"),
        (GOOD + "\n[retention]\nkeep = 1\n", "retention.keep: unknown key"),
        (GOOD + "\n[qc]\non_fail = \"drop\"\n", "qc.on_fail: expected one of send, hold, got 'drop'"),
        (GOOD + "\n[qc]\non_warn = true\n", "qc.on_warn: expected one of send, hold"),
        (GOOD + "\n[qc]\nhold = true\n", "qc.hold: unknown key"),
        (GOOD + "\n[qc]\nflip_every = 0\n", "qc.flip_every: must be > 0"),
        (GOOD + "\n[qc]\nflip_warn = 0.5\nflip_fail = 0.2\n", "qc.flip_fail: must be >= flip_warn"),
        ("[node\n", "invalid TOML"),
        (GOOD.replace("port = 11112", "port = 11112\nreceivers = 0"), "node.receivers: must be > 0"),
        (GOOD.replace("port = 11112", "port = 11112\nreceivers = 33"), "node.receivers: must be at most 32"),
        (GOOD.replace("port = 11112", "port = 11112\nreceivers = \"4\""), "node.receivers"),
    ],
)
def test_bad_configuration_names_file_key_and_problem(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and fragment in msg and "\n" not in msg


def test_cli_exits_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("port = 11112", "port = 70000"))
    for cmd in (["serve"], ["status"], ["worker"], ["retry", "1"], ["release", "1"]):
        res = subprocess.run([sys.executable, "-m", "dicom_node.cli", *cmd, "--config", str(path)],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2, (cmd, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "node.port" in lines[0] and str(path) in lines[0]
    missing = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(tmp_path / "nope.toml")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "file not found" in missing.stderr


def test_flags_override_the_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD)).with_overrides(node={"port": 4000, "ae_title": None})
    assert cfg.node.port == 4000 and cfg.node.ae_title == "NODE1"


def test_rules_and_destinations_parse_into_enums(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD + """
[[series.rules]]
name = "t1"
classify = "T1"
echo_time_ms = [0, 20]
scanning_sequence = ["se", "GR"]
[[destinations]]
ae_title = "ORTHANC"
host = "127.0.0.1"
port = 4242
directions = ["t1-to-t2"]
"""))
    (rule,) = cfg.series.rules
    assert rule.classify is Classification.T1 and rule.echo_time_ms == (0.0, 20.0) and rule.scanning_sequence == ("SE", "GR")
    assert cfg.destinations[0].directions == (Direction.T1_TO_T2,)


def test_qc_policy_parses_into_enums_once(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD + '\n[qc]\non_warn = "hold"\non_fail = "send"\nflip_every = 6\n'))
    assert cfg.qc.on_warn is QCAction.HOLD and cfg.qc.on_fail is QCAction.SEND and cfg.qc.flip_every == 6
    assert "qc=on(warn=hold,fail=send)" in cfg.summary()
    off = load_config(write(tmp_path, GOOD + "\n[qc]\nenabled = false\n"))
    assert not off.qc.enabled and off.qc.on_fail is QCAction.HOLD


def test_flip_thresholds_are_the_models_unless_configured(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.qc.flip_warn is None and cfg.qc.flip_fail is None  # the model's own (ml.qc.flip_thresholds)
    one = load_config(write(tmp_path, GOOD + "\n[qc]\nflip_warn = 0.2\n"))
    assert one.qc.flip_warn == 0.2 and one.qc.flip_fail is None
