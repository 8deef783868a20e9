"""The burned-in label that keeps synthetic images recognisable without their attributes."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node.label import burn_in_label


def test_label_is_drawn_in_the_top_left_corner_of_every_slice_only() -> None:
    pixels = np.full((3, 128, 128), 500, np.uint16)
    out = burn_in_label(pixels, "SYNTHETIC T2", value=3000)
    assert out.dtype == np.uint16 and out.shape == pixels.shape
    assert np.array_equal(pixels, np.full((3, 128, 128), 500, np.uint16))  # input untouched
    changed = out != pixels
    assert all(changed[k].any() for k in range(3))
    ys, xs = np.nonzero(changed[0])
    assert ys.max() < 128 // 4 and xs.max() < 128  # a band at the top
    assert (out[0][out[0] != 0] != 500).any() and set(np.unique(out[0][changed[0]])) <= {0, 3000}
    assert np.array_equal(out[0], out[2])
    # the rest of the image is exactly the synthetic output
    assert np.array_equal(out[:, 40:, :], pixels[:, 40:, :])


def test_label_value_defaults_to_a_bright_level_and_small_images_work() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 1000, (2, 32, 48), dtype=np.uint16)
    out = burn_in_label(pixels)
    assert (out != pixels).any() and out.max() <= pixels.max()


def test_label_rejects_float_pixels() -> None:
    with pytest.raises(ValueError, match="pixels"):
        burn_in_label(np.zeros((1, 8, 8), np.float32))


def test_a_qc_verdict_other_than_pass_is_named_in_the_label() -> None:
    from dicom_node.label import synthetic_label

    assert synthetic_label("T2") == synthetic_label("T2", "pass") == "SYNTHETIC T2"
    assert synthetic_label("T2", "warn") == "SYNTHETIC T2 - QC WARN"
    assert synthetic_label("T1", "fail") == "SYNTHETIC T1 - QC FAIL"


def test_a_label_wider_than_a_small_image_is_broken_into_lines_and_stays_inside_it() -> None:
    from dicom_node.label import label_mask

    ink_one, box_one = label_mask(64, 64, "SYNTHETIC T2")
    ink, box = label_mask(64, 64, "SYNTHETIC T2 - QC WARN")
    rows_one, rows_two = np.nonzero(box_one.any(axis=1))[0], np.nonzero(box.any(axis=1))[0]
    assert rows_two.max() > rows_one.max() + 4  # a second line below the first
    assert not ink[:, -1].any()  # nothing cut off at the right edge
    assert not np.array_equal(ink, ink_one)
    wide_ink, _ = label_mask(256, 512, "SYNTHETIC T2 - QC WARN")  # fits on one line
    assert np.nonzero(wide_ink.any(axis=1))[0].max() < 256 // 20 + 8
