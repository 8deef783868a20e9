"""Series selection rules: their type and the rules the node uses unless ``[[series.rules]]`` replaces them."""

from __future__ import annotations

from dataclasses import dataclass

from vocab import Classification

__all__ = ["DEFAULT_RULES", "SelectionRule"]


@dataclass(frozen=True)
class SelectionRule:
    """One ordered classification rule; the first rule that matches wins.

    Every condition that is set must hold.  ``classify`` is T1, T2 or
    not_eligible (an exclusion rule, e.g. FLAIR or diffusion).
    """

    name: str
    classify: Classification
    description: str | None = None  # regex on SeriesDescription or ProtocolName
    exclude_description: str | None = None
    repetition_time_ms: tuple[float, float] | None = None
    echo_time_ms: tuple[float, float] | None = None
    inversion_time_ms: tuple[float, float] | None = None
    scanning_sequence: tuple[str, ...] = ()  # any of, e.g. ["SE"], ["GR", "IR"]


# Names are matched between non-alphanumeric boundaries ("_" separates, as in
# "ep2d_dwi" or "sT1W_3D_TFE"), so "REST1" or "T10" never read as T1.
_B = r"(?<![a-z0-9])"
_E = r"(?![a-z0-9])"

DEFAULT_RULES: tuple[SelectionRule, ...] = (
    SelectionRule(
        name="exclude-non-structural",
        classify=Classification.NOT_ELIGIBLE,
        description=(
            rf"(?i){_B}(flair|dark.?fluid|dwi|dti|diff\w*|adc|trace|swi|swan|t2\*|t2.?star|bold|fmri|rest[0-9]*|task|"
            rf"perf\w*|dsc|dce|asl|mra|tof|angio\w*|mip|scout|localizer|localiser|survey|aahead|calibration|"
            rf"field.?map|b0|map|stir|pd){_E}"
        ),
    ),
    SelectionRule(
        name="exclude-echo-planar",
        classify=Classification.NOT_ELIGIBLE,
        scanning_sequence=("EP",),
    ),
    SelectionRule(
        name="t2-by-name",
        classify=Classification.T2,
        description=rf"(?i){_B}(t2(?![0-9*])|t2w|propeller|blade)",
        echo_time_ms=(50.0, 400.0),
        repetition_time_ms=(1500.0, 20000.0),
    ),
    SelectionRule(
        name="t1-by-name",
        classify=Classification.T1,
        description=rf"(?i){_B}(t1(?![0-9])|mp-?rage|mp2rage|spgr|bravo|tfl|tfe|flash|vibe)",
        echo_time_ms=(0.0, 30.0),
    ),
    SelectionRule(
        name="t1-spin-echo-by-parameters",
        classify=Classification.T1,
        repetition_time_ms=(300.0, 900.0),
        echo_time_ms=(0.0, 30.0),
        scanning_sequence=("SE",),
    ),
    SelectionRule(
        name="t2-spin-echo-by-parameters",
        classify=Classification.T2,
        repetition_time_ms=(2000.0, 20000.0),
        echo_time_ms=(70.0, 400.0),
        scanning_sequence=("SE",),
    ),
)
