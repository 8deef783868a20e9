"""Rejected associations are logged and listed by `status --json` with called AE, calling AE, peer and reason."""

from __future__ import annotations

from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from nodeproc import NodeProcess


def associate(port: int, calling: str, called: str = "DICOMNODE") -> object:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    return ae.associate("127.0.0.1", port, ae_title=called)


def test_rejections_say_who_asked_for_whom_and_why(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "node", node={"max_associations": 1}) as node:
        assert not associate(node.port, "INTRUDER").is_established  # calling AE not allowed
        assert not associate(node.port, "STORESCU", called="SOMEONE_ELSE").is_established  # wrong called AE
        held = associate(node.port, "SENDER1")
        assert held.is_established
        try:
            assert not associate(node.port, "SENDER2").is_established  # over the association limit
        finally:
            held.release()
        rejections = [r for r in node.status()["rejections"] if r["kind"] == "association"]
        log = node.log()
        counted = node.metrics()
    for reason in ("calling_aet_not_allowed", "called_aet_not_ours", "association_limit"):  # /metrics: one each
        assert counted[f'dicomnode_associations_rejected_total{{reason="{reason}"}}'] == 1, reason
    assert counted['dicomnode_associations_rejected_total{reason="other"}'] == 0
    by_calling = {r["calling_aet"]: r for r in rejections}
    assert set(by_calling) == {"INTRUDER", "STORESCU", "SENDER2"}
    assert by_calling["INTRUDER"]["reason"].startswith("calling AE title not allowed")
    assert by_calling["INTRUDER"]["called_aet"] == "DICOMNODE"
    assert by_calling["STORESCU"]["called_aet"] == "SOMEONE_ELSE"
    assert by_calling["STORESCU"]["reason"].startswith("called AE title is not ours")
    assert by_calling["SENDER2"]["reason"].startswith("association limit reached")
    assert by_calling["SENDER2"]["status"] == "rejected (transient)"
    assert all(r["peer"].startswith("127.0.0.1:") for r in rejections)
    assert "association rejected: called AE 'SOMEONE_ELSE', calling AE 'STORESCU', peer 127.0.0.1:" in log
    assert "calling AE 'INTRUDER'" in log and "association limit reached" in log
