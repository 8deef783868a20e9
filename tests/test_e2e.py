"""End to end: a series sent to the node comes back to a real PACS (Orthanc) as a synthetic series.

Real processes on loopback throughout: ``dicomnode serve`` with a worker process,
dcmtk ``storescu`` as the scanner, Orthanc and dcmtk ``storescp`` as destinations.
The shipped default models do the synthesis.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import RLELossless, generate_uid

from dicomgen import SeriesSpec, make_series, write_series
from netutil import DcmtkStoreSCP, PynetdicomStoreSCP, needs_dcmtk, needs_orthanc, needs_shared, storescu
from nodeproc import NodeProcess
from orthanc import OrthancServer

pytestmark = [needs_dcmtk, needs_orthanc, pytest.mark.slow]

FAST = {"series": {"quiet_seconds": 1.0, "min_slices": 4},
        "worker": {"processes": 1, "lease_seconds": 30},
        "delivery": {"backoff_initial_seconds": 1.0, "backoff_max_seconds": 2.0, "max_attempts": 20,
                     "timeout_seconds": 10.0},
        "model": {"device": "cpu", "batch_size": 8}}


def start_node(folder: Path, destinations: list[dict[str, Any]], **over: dict[str, Any]) -> NodeProcess:
    sections = {k: dict(v) for k, v in FAST.items()}
    for k, v in over.items():
        sections.setdefault(k, {}).update(v)
    return NodeProcess(folder, destinations=destinations, **sections).start()


def dest(server: Any, name: str) -> dict[str, Any]:
    port = getattr(server, "dicom_port", None) or server.port
    return {"name": name, "ae_title": server.ae_title, "host": "127.0.0.1", "port": port}


def send(node: NodeProcess, datasets: list, folder: Path, extra: list[str] | None = None) -> None:
    res = storescu(node.port, write_series(datasets, folder), extra=extra)
    assert res.returncode == 0, res.stderr


def job_of(node: NodeProcess, series_uid: str, states: tuple[str, ...], timeout: float = 180) -> dict[str, Any]:
    st = node.wait_for(
        lambda s: any(j["source_series_uid"] == series_uid and j["state"] in states for j in s["jobs"]),
        timeout=timeout, what=f"job of {series_uid} in {states}")
    return next(j for j in st["jobs"] if j["source_series_uid"] == series_uid and j["state"] in states)


def qc_flag(job: dict[str, Any]) -> str:
    """What a job's QC verdict appends to SeriesDescription ("" for pass)."""
    verdict = job["qc"]["verdict"]
    return "" if verdict == "pass" else f" QC {verdict.upper()}"


def synthetic_in_orthanc(pacs: OrthancServer, study_uid: str) -> list[dict[str, Any]]:
    return [s for s in pacs.series_of_study(study_uid)
            if str(s["MainDicomTags"].get("SeriesDescription", "")).startswith("SYNTHETIC")]


def read_back(pacs: OrthancServer, series_uid: str) -> list:
    from io import BytesIO

    return [dcmread(BytesIO(pacs.instance_file(i["ID"]))) for i in pacs.instances_of_series(series_uid)]


def by_position(datasets: list) -> list:
    normal = np.cross(np.array(datasets[0].ImageOrientationPatient[:3], float),
                      np.array(datasets[0].ImageOrientationPatient[3:], float))
    return sorted(datasets, key=lambda d: float(np.dot(np.array(d.ImagePositionPatient, float), normal)))


def assert_synthetic_matches_source(out: list, src: list, target: str) -> None:
    assert len(out) == len(src)
    for o, s in zip(by_position(out), by_position(src)):
        assert o.StudyInstanceUID == s.StudyInstanceUID and o.FrameOfReferenceUID == s.FrameOfReferenceUID
        assert o.SeriesInstanceUID != s.SeriesInstanceUID and o.SOPInstanceUID != s.SOPInstanceUID
        assert o.PatientID == s.PatientID and o.PatientName == s.PatientName
        assert np.allclose([float(v) for v in o.ImagePositionPatient], [float(v) for v in s.ImagePositionPatient], atol=1e-3)
        assert np.allclose([float(v) for v in o.ImageOrientationPatient], [float(v) for v in s.ImageOrientationPatient], atol=1e-4)
        assert [float(v) for v in o.PixelSpacing] == [float(v) for v in s.PixelSpacing]
        assert list(o.ImageType)[:3] == ["DERIVED", "SECONDARY", "OTHER"]
        assert o.SyntheticData == "YES" and o.SeriesDescription.startswith(f"SYNTHETIC {target} (AI)")
        assert o.SourceImageSequence[0].ReferencedSOPInstanceUID == s.SOPInstanceUID
        assert o.pixel_array.shape == s.pixel_array.shape and o.pixel_array.max() > 0
        assert o.BurnedInAnnotation == "YES"  # "SYNTHETIC T2" drawn into the image


def test_t1_and_t2_series_come_back_synthesized_to_orthanc_and_storescp(tmp_path: Path) -> None:
    with OrthancServer(tmp_path / "orthanc") as pacs, DcmtkStoreSCP(tmp_path / "storescp") as scp:
        # the second destination asks for synthetic T2 only (a per-destination direction filter)
        node = start_node(tmp_path / "node", [dest(pacs, "orthanc"), {**dest(scp, "storescp"), "directions": ["t1-to-t2"]}])
        try:
            study = generate_uid()
            t1 = make_series(SeriesSpec(weighting="T1", slices=12, study_uid=study, series_number=3))
            t2 = make_series(SeriesSpec(weighting="T2", slices=12, study_uid=study, series_number=4))
            send(node, t1, tmp_path / "t1")
            send(node, t2, tmp_path / "t2")
            j1 = job_of(node, t1[0].SeriesInstanceUID, ("done",))
            j2 = job_of(node, t2[0].SeriesInstanceUID, ("done",))
            assert j1["direction"] == "t1-to-t2" and j2["direction"] == "t2-to-t1"
            assert set(j1["timings"]) >= {"waiting", "loading", "inference", "building", "sending"}
            assert j1["deliveries"] == {"orthanc": "12/12 stored", "storescp": "12/12 stored"}
            assert j2["deliveries"] == {"orthanc": "12/12 stored"}

            series = synthetic_in_orthanc(pacs, study)
            assert sorted(s["MainDicomTags"]["SeriesInstanceUID"] for s in series) == sorted(
                [j1["output_series_uid"], j2["output_series_uid"]])
            out_t2 = read_back(pacs, j1["output_series_uid"])
            assert_synthetic_matches_source(out_t2, t1, "T2")
            assert {int(d.SeriesNumber) for d in out_t2} == {1003}
            out_t1 = read_back(pacs, j2["output_series_uid"])
            assert_synthetic_matches_source(out_t1, t2, "T1")
            # the second destination got the synthetic T2 series and nothing else
            got = [dcmread(p, stop_before_pixels=True) for p in (tmp_path / "storescp").iterdir()]
            assert {d.SeriesInstanceUID for d in got} == {j1["output_series_uid"]}
            assert len(got) == 12
            # our own output routed back to us is stored but never processed
            send(node, out_t2, tmp_path / "loop")
            node.wait_for(lambda s: any(x["series_uid"] == j1["output_series_uid"] and x["state"] == "not_selected"
                                        for x in s["series"]), what="own output not selected")
            assert len([j for j in node.status()["jobs"]]) == 2
            log = node.log()
            assert "Phantom" not in log and "PHANTOM-001" not in log and "19700101" not in log
        finally:
            node.stop()


def test_destination_down_then_up_is_delivered_after_a_retry(tmp_path: Path) -> None:
    pacs = OrthancServer(tmp_path / "orthanc")  # ports chosen, not started yet
    node = start_node(tmp_path / "node", [dest(pacs, "orthanc")])
    try:
        t1 = make_series(SeriesSpec(weighting="T1", slices=8))
        send(node, t1, tmp_path / "t1")
        node.wait_for(lambda s: s["jobs"] and s["jobs"][0]["state"] == "delivering" and s["jobs"][0]["attempts"] >= 1,
                      timeout=180, what="a failed delivery attempt")
        pacs.start()
        job = job_of(node, t1[0].SeriesInstanceUID, ("done",))
        assert job["attempts"] >= 1
        assert [s["MainDicomTags"]["SeriesInstanceUID"] for s in synthetic_in_orthanc(pacs, t1[0].StudyInstanceUID)] == [
            job["output_series_uid"]]
        assert len(pacs.instances_of_series(job["output_series_uid"])) == 8
    finally:
        node.stop()
        pacs.stop()


def test_permanent_rejection_fails_the_job_and_retry_requeues_it(tmp_path: Path) -> None:
    answers = {"code": 0xC000}
    with PynetdicomStoreSCP(lambda i, ds: answers["code"], ae_title="PICKY") as picky:
        node = start_node(tmp_path / "node", [dest(picky, "picky")])
        try:
            t1 = make_series(SeriesSpec(weighting="T1", slices=6))
            send(node, t1, tmp_path / "t1")
            failed = job_of(node, t1[0].SeriesInstanceUID, ("failed",))
            assert "0xC000" in failed["error"] and "picky" in failed["error"]
            assert failed["attempts"] == 0  # permanent: not retried
            answers["code"] = 0x0000  # the PACS administrator fixed it
            res = node.cli("retry", str(failed["id"]))
            assert "re-queued" in res.stdout
            done = job_of(node, t1[0].SeriesInstanceUID, ("done",))
            assert done["id"] == failed["id"]
            assert node.cli("retry", "12345", check=False).returncode == 2
        finally:
            node.stop()


def test_kill_9_during_inference_and_during_sending_still_delivers_exactly_one_series(tmp_path: Path) -> None:
    with PynetdicomStoreSCP(0x0000, ae_title="SLOWPACS", delay=6.0, delay_at=3) as slow:
        # torch eager on a larger series: a job ONNX Runtime would finish before it can be caught running
        node = start_node(tmp_path / "node", [dest(slow, "slow")], model={"engine": "torch"})
        try:
            t1 = make_series(SeriesSpec(weighting="T1", slices=48, rows=256, cols=256))
            send(node, t1, tmp_path / "t1")
            uid = t1[0].SeriesInstanceUID
            job_of(node, uid, ("running",), timeout=60)
            killed = node.kill9()  # during loading/inference: serve and its worker die
            assert killed and not slow.received
            node.start()
            delivering = job_of(node, uid, ("delivering",), timeout=180)
            assert not delivering["worker"].endswith(tuple(f":{p}" for p in killed))  # a new worker resumed it
            deadline = time.monotonic() + 60
            while len(slow.received) < 4 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(slow.received) == 4  # the destination is sitting on instance 4
            sender = node.worker_pids()
            killed = node.kill9()  # during sending
            assert set(sender) <= set(killed)
            time.sleep(7)  # the destination's answer to instance 4 now goes nowhere
            assert len(slow.received) == 4  # nothing was sent after the kill
            node.start()
            job = job_of(node, uid, ("done",), timeout=180)
            assert job["output_instances"] == 48
            out_dir = node.storage / "output" / f"job-{job['id']}"
            expected = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in out_dir.glob("*.dcm")}
            assert len(expected) == 48 and set(slow.received) == expected  # one series, every instance
            # the first four went twice: before the kill, and again by the restarted node's worker
            assert len(slow.received) == 52 and set(slow.received[:4]) <= set(slow.received[4:])
            series_uids = {dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in out_dir.glob("*.dcm")}
            assert series_uids == {job["output_series_uid"]}
        finally:
            node.stop()


def test_a_late_instance_gives_a_new_synthetic_series_and_never_reuses_an_instance_uid(tmp_path: Path) -> None:
    """An archive that does not overwrite (Orthanc's default) must not end up holding a mixed series."""
    with OrthancServer(tmp_path / "orthanc", extra_config={"OverwriteInstances": False}) as pacs:
        node = start_node(tmp_path / "node", [dest(pacs, "orthanc")])
        try:
            t1 = make_series(SeriesSpec(weighting="T1", slices=14, shuffle_instance_numbers=True))
            send(node, t1[:10], tmp_path / "first")
            first = job_of(node, t1[0].SeriesInstanceUID, ("done",))
            send(node, t1[10:], tmp_path / "late")
            node.wait_for(lambda s: any(j["state"] == "done" and j["id"] != first["id"] for j in s["jobs"]),
                          timeout=180, what="second job done")
            jobs = {j["id"]: j for j in node.status()["jobs"]}
            second = next(j for j in jobs.values() if j["id"] != first["id"])
            old = read_back(pacs, first["output_series_uid"])
            new = read_back(pacs, second["output_series_uid"])
            # two distinct series, each exactly its own job's output, no instance UID in both
            assert second["output_series_uid"] != first["output_series_uid"]
            assert len(old) == 10 and len(new) == 14
            assert not {d.SOPInstanceUID for d in old} & {d.SOPInstanceUID for d in new}
            for job, got in ((first, old), (second, new)):
                built = {dcmread(p).SOPInstanceUID: dcmread(p) for p in
                         (node.storage / "output" / f"job-{job['id']}").glob("*.dcm")}
                assert {d.SOPInstanceUID for d in got} == set(built)
                for d in got:  # no mixed pixels: what the PACS holds is what this job built
                    assert d.PixelData == built[d.SOPInstanceUID].PixelData
            # the archive user sees which is current; the ledger marks the old one superseded
            # (a QC verdict other than pass is named after it: the phantom may warn, see test_qc_e2e.py)
            assert {d.SeriesDescription for d in old} == {"SYNTHETIC T2 (AI) from t1_se_tra" + qc_flag(first)}
            assert {d.SeriesDescription for d in new} == {"SYNTHETIC T2 (AI) from t1_se_tra v2" + qc_flag(second)}
            assert all(f"replaces synthetic series {first['output_series_uid']}" in d.ImageComments for d in new)
            assert jobs[first["id"]]["state"] == "superseded"
            assert f"superseded by job {second['id']}" in jobs[first["id"]]["error"]
            assert len(synthetic_in_orthanc(pacs, t1[0].StudyInstanceUID)) == 2
            # each synthetic image keeps its source image's InstanceNumber
            number_of = {d.SOPInstanceUID: int(d.InstanceNumber) for d in t1}
            for d in old + new:
                assert int(d.InstanceNumber) == number_of[d.SourceImageSequence[0].ReferencedSOPInstanceUID]
        finally:
            node.stop()


def test_a_corrupt_instance_fails_its_job_and_leaves_other_series_alone(tmp_path: Path) -> None:
    with OrthancServer(tmp_path / "orthanc") as pacs:
        node = start_node(tmp_path / "node", [dest(pacs, "orthanc")])
        try:
            study = generate_uid()
            bad = make_series(SeriesSpec(weighting="T1", slices=8, study_uid=study))
            broken = bad[4]
            broken.compress(RLELossless)
            data = bytearray(broken.PixelData)
            data[80:] = bytes(len(data) - 80)  # RLE segments no longer decode
            broken.PixelData = bytes(data)
            good = make_series(SeriesSpec(weighting="T2", slices=8, study_uid=study))
            send(node, bad[:4] + bad[5:], tmp_path / "bad")
            send(node, [broken], tmp_path / "broken", extra=["-xr"])
            send(node, good, tmp_path / "good")
            failed = job_of(node, bad[0].SeriesInstanceUID, ("failed",))
            assert broken.SOPInstanceUID in failed["error"] or "decode" in failed["error"].lower(), failed["error"]
            done = job_of(node, good[0].SeriesInstanceUID, ("done",))
            assert len(pacs.instances_of_series(done["output_series_uid"])) == 8
        finally:
            node.stop()


def test_a_separate_worker_process_takes_jobs_from_the_shared_ledger(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    with DcmtkStoreSCP(tmp_path / "storescp") as scp:
        node = start_node(tmp_path / "node", [dest(scp, "storescp")], worker={"processes": 0})
        worker = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "worker", "--config", str(node.config)],
                                  stdout=subprocess.DEVNULL, stderr=open(tmp_path / "worker.log", "wb"))
        try:
            t1 = make_series(SeriesSpec(weighting="T1", slices=6))
            send(node, t1, tmp_path / "t1")
            job = job_of(node, t1[0].SeriesInstanceUID, ("done",))
            assert job["worker"].endswith(f":{worker.pid}")
            assert len(list((tmp_path / "storescp").iterdir())) == 6
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(60) == 0
            node.stop()


@needs_shared
def test_real_enhanced_mr_t1_from_a_siemens_xa30_comes_back_as_classic_mr(tmp_path: Path) -> None:
    """Siemens XA30 Prisma Fit T1w tfl, Enhanced MR Image Storage, 96 frames (neurolabusc dcm_qa_xa30, BSD-2)."""
    from netutil import SHARED_DATA

    src_file = sorted((SHARED_DATA / "dicom" / "dcm_qa_xa30").glob("5_*.dcm"))[0]
    src = dcmread(src_file)
    with OrthancServer(tmp_path / "orthanc") as pacs:
        node = start_node(tmp_path / "node", [dest(pacs, "orthanc")])
        try:
            res = storescu(node.port, [src_file])
            assert res.returncode == 0, res.stderr
            job = job_of(node, src.SeriesInstanceUID, ("done", "failed"))
            assert job["state"] == "done", job["error"]
            out = read_back(pacs, job["output_series_uid"])
            assert len(out) == int(src.NumberOfFrames) == 96
            assert {d.SOPClassUID for d in out} == {"1.2.840.10008.5.1.4.1.1.4"}  # classic MR Image Storage
            assert {d.StudyInstanceUID for d in out} == {src.StudyInstanceUID}
            frames = sorted(int(d.SourceImageSequence[0].ReferencedFrameNumber) for d in out)
            assert frames == list(range(1, 97))
            assert {d.SourceImageSequence[0].ReferencedSOPInstanceUID for d in out} == {src.SOPInstanceUID}
            pf = src.PerFrameFunctionalGroupsSequence
            for d in out:
                f = pf[int(d.SourceImageSequence[0].ReferencedFrameNumber) - 1]
                assert np.allclose([float(v) for v in d.ImagePositionPatient],
                                   [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient], atol=1e-3)
        finally:
            node.stop()
