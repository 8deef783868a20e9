"""Series selection: is a completed series a T1, a T2, or not eligible?

:func:`facts` extracts, once per received instance, the few header values the
rules need (no patient data).  :func:`classify` looks at all instances of a
series: fixed eligibility checks first (MR image SOP class, ORIGINAL, not a
localizer, not derived/synthetic/ours, enough slices, one geometry), then the
ordered rules of ``[[series.rules]]``; the first matching rule wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from pydicom.tag import Tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_node.config import SelectionRule, SeriesConfig
from vocab import Classification

MR_IMAGE_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
    }
)

#: marks our own output (ContributingEquipmentSequence Manufacturer)
OUR_MANUFACTURER = "dicomnode"


@dataclass(frozen=True)
class Decision:
    classification: Classification
    reason: str

    @property
    def selected(self) -> bool:
        return self.classification in (Classification.T1, Classification.T2)


def _num(v: Any) -> float | None:
    try:
        return None if v is None or v == "" else float(v)
    except (TypeError, ValueError):
        return None


def _strs(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return [str(x).strip().upper() for x in v]
    return [s.strip().upper() for s in str(v).split("\\") if s.strip()]


def _first(ds: Dataset, *path: str) -> Any:
    """Follow a path of (sequence, ..., keyword), taking the first item of each sequence."""
    cur: Any = ds
    for name in path[:-1]:
        seq = cur.get(name)
        if not seq:
            return None
        cur = seq[0]
    return cur.get(path[-1])


#: top-level elements that :func:`_facts` reads from a classic (single-frame) data set
_FACT_TAGS = tuple(
    Tag(k)
    for k in (
        "SpecificCharacterSet", "ImageType", "Modality", "SeriesDescription", "ContributingEquipmentSequence",
        "ScanningSequence", "RepetitionTime", "EchoTime", "InversionTime", "ProtocolName",
        "ImageOrientationPatient", "SamplesPerPixel", "NumberOfFrames", "Rows", "Columns", "PixelSpacing",
        "BitsAllocated", "EchoPulseSequence", "EchoPlanarPulseSequence", "SyntheticData",
    )
)
_FUNCTIONAL_GROUPS = (0x52009229, 0x52009230)  # Shared / Per-frame Functional Groups Sequence
_facts_cache: dict[tuple[Any, ...], dict[str, Any]] = {}


def _raw_key(ds: Dataset) -> tuple[Any, ...] | None:
    """The encoded values :func:`_facts` depends on, or None when they are not all at hand.

    Slices of one series share these values, so the facts are computed once
    per series and header variant instead of once per instance.
    """
    if any(t in ds for t in _FUNCTIONAL_GROUPS):
        return None
    key: list[Any] = []
    for tag in _FACT_TAGS:
        elem = ds.get_item(tag, keep_deferred=True)
        if elem is None:
            key.append(None)
        elif isinstance(elem, RawDataElement) and elem.value is not None:
            key.append((elem.VR, elem.is_implicit_VR, elem.is_little_endian, elem.value))
        else:  # already decoded, or deferred (large): no cheap key
            return None
    return tuple(key)


def facts(ds: Dataset) -> dict[str, Any]:
    """Header facts for selection; JSON-serialisable, no patient data."""
    key = _raw_key(ds)
    if key is None:
        return _facts(ds)
    cached = _facts_cache.get(key)
    if cached is None:
        cached = _facts(ds)
        if len(_facts_cache) >= 256:
            _facts_cache.clear()
        _facts_cache[key] = cached
    return {k: list(v) if isinstance(v, list) else v for k, v in cached.items()}  # callers may change their copy


def _facts(ds: Dataset) -> dict[str, Any]:
    enhanced = "NumberOfFrames" in ds and ("SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds)
    tr = _num(ds.get("RepetitionTime"))
    te = _num(ds.get("EchoTime"))
    ti = _num(ds.get("InversionTime"))
    seq = _strs(ds.get("ScanningSequence"))
    iop = ds.get("ImageOrientationPatient")
    spacing = ds.get("PixelSpacing")
    if enhanced:
        sh = ("SharedFunctionalGroupsSequence",)
        pf = ("PerFrameFunctionalGroupsSequence",)
        tr = tr or _num(_first(ds, *sh, "MRTimingAndRelatedParametersSequence", "RepetitionTime"))
        te = te or _num(_first(ds, *sh, "MREchoSequence", "EffectiveEchoTime")) or _num(
            _first(ds, *pf, "MREchoSequence", "EffectiveEchoTime")
        )
        ti = ti or _num(_first(ds, *sh, "MRModifierSequence", "InversionTimes"))
        iop = iop or _first(ds, *sh, "PlaneOrientationSequence", "ImageOrientationPatient") or _first(
            ds, *pf, "PlaneOrientationSequence", "ImageOrientationPatient"
        )
        spacing = spacing or _first(ds, *sh, "PixelMeasuresSequence", "PixelSpacing") or _first(
            ds, *pf, "PixelMeasuresSequence", "PixelSpacing"
        )
        if not seq:
            eps = str(ds.get("EchoPulseSequence", "")).upper()
            seq = {"SPIN": ["SE"], "GRADIENT": ["GR"], "BOTH": ["SE", "GR"]}.get(eps, [])
        epi = ds.get("EchoPlanarPulseSequence") or _first(ds, "SharedFunctionalGroupsSequence",
                                                          "MRImagingModifierSequence", "EchoPlanarPulseSequence")
        if str(epi or "").upper() == "YES" and "EP" not in seq:
            seq = [*seq, "EP"]
    ours = False
    for item in ds.get("ContributingEquipmentSequence", []) or []:
        if OUR_MANUFACTURER in str(item.get("Manufacturer", "")).lower():
            ours = True
    return {
        "modality": str(ds.get("Modality", "")),
        "image_type": _strs(ds.get("ImageType")),
        "description": str(ds.get("SeriesDescription", "")),
        "protocol": str(ds.get("ProtocolName", "")),
        "tr": tr,
        "te": te,
        "ti": ti,
        "scanning_sequence": seq,
        "rows": int(ds.get("Rows", 0) or 0),
        "samples": int(ds.get("SamplesPerPixel", 1) or 1),
        "bits": int(ds.get("BitsAllocated", 0) or 0),
        "cols": int(ds.get("Columns", 0) or 0),
        "frames": int(ds.get("NumberOfFrames", 1) or 1),
        "iop": [round(float(x), 3) for x in iop] if iop is not None and len(iop) == 6 else None,
        "spacing": [round(float(x), 4) for x in spacing] if spacing is not None and len(spacing) == 2 else None,
        "synthetic": str(ds.get("SyntheticData", "")).upper() == "YES",
        "ours": ours,
    }


def _in(v: float | None, rng: tuple[float, float] | None) -> bool:
    return rng is None or (v is not None and rng[0] <= v <= rng[1])


def rule_matches(rule: SelectionRule, f: dict[str, Any]) -> bool:
    text = f"{f.get('description', '')} {f.get('protocol', '')}"
    if rule.description is not None and not re.search(rule.description, text):
        return False
    if rule.exclude_description is not None and re.search(rule.exclude_description, text):
        return False
    if not (_in(f.get("tr"), rule.repetition_time_ms) and _in(f.get("te"), rule.echo_time_ms)
            and _in(f.get("ti"), rule.inversion_time_ms)):
        return False
    if rule.scanning_sequence and not set(rule.scanning_sequence) & set(f.get("scanning_sequence") or []):
        return False
    return True


def classify(instances: Sequence[dict[str, Any]], cfg: SeriesConfig) -> Decision:
    """Classify a complete series from its instances' :func:`facts`."""
    ne = Classification.NOT_ELIGIBLE
    if not instances:
        return Decision(ne, "no instances")
    classes = {i.get("sop_class_uid", "") for i in instances}
    not_mr = sorted(c for c in classes if c not in MR_IMAGE_CLASSES)
    if not_mr:
        name = UID(not_mr[0]).name if not_mr[0] else "unknown"
        return Decision(ne, f"not an MR image series ({name})")
    if any(i.get("ours") for i in instances):
        return Decision(ne, "synthetic series made by dicomnode (never re-processed)")
    if any(i.get("synthetic") for i in instances):
        return Decision(ne, "Synthetic Data = YES")
    types = [i.get("image_type") or [] for i in instances]
    if any(t and t[0] == "DERIVED" for t in types):
        return Decision(ne, "derived images (ImageType DERIVED)")
    if any("LOCALIZER" in t for t in types):
        return Decision(ne, "localizer (ImageType LOCALIZER)")
    slices = sum(int(i.get("frames") or 1) for i in instances)
    if slices < cfg.min_slices:
        return Decision(ne, f"only {slices} slices (series.min_slices = {cfg.min_slices})")
    geometries = {(i.get("rows"), i.get("cols"), tuple(i.get("iop") or ()), tuple(i.get("spacing") or ())) for i in instances}
    if len(geometries) > 1:
        return Decision(ne, f"more than one geometry in the series ({len(geometries)} orientations/sizes)")
    if not next(iter(geometries))[2]:
        return Decision(ne, "no image orientation")
    f = instances[0]
    for rule in cfg.rules:
        if rule_matches(rule, f):
            if rule.classify is ne:
                return Decision(ne, f"excluded by rule {rule.name!r}")
            return Decision(rule.classify, f"rule {rule.name!r}")
    return Decision(
        ne,
        f"no selection rule matched (TR={f.get('tr')}, TE={f.get('te')}, sequence={'/'.join(f.get('scanning_sequence') or []) or '-'})",
    )
