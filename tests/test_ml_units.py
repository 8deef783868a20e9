"""Unit tests of ml/: networks, data handling, checkpoints, inference (small, CPU, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from ml.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, write_metadata
from ml.data import (CANONICAL, DataError, canonical_shape, from_canonical, head_mask, load_volume, normalize,
                     slice_stack, to_canonical)
from ml.inference import load_model, predict_normalized, synthesize
from ml.metrics import compare, unit_range
from ml.networks import Architecture, OptionError, SobelLayer, build_network, parse_options

from dicomgen import phantom

TINY = {"base_width": 4, "depth": 2, "dropout": 0.1}


def _head(shape: tuple[int, int, int] = (12, 40, 36), weighting: str = "T1", seed: int = 0) -> np.ndarray:
    """(i, j, k) volume from the test phantom (which is (slices, rows, cols))."""
    return np.transpose(phantom(shape, weighting, seed=seed), (2, 1, 0)).astype(np.float32)  # type: ignore[arg-type]


def _tiny_checkpoint(path: Path, direction: str = "t1-to-t2", **net: object) -> Path:
    opts = parse_options({**TINY, **net})
    torch.manual_seed(0)
    model = build_network(opts)
    meta = {"name": "tiny", "version": "1", "architecture": opts.architecture.value, "network": opts.to_dict(),
            "direction": direction, "output_scale": 1000.0, "output_max": 1000}
    save_checkpoint(path, model.state_dict(), meta)
    return path


# ------------------------------------------------------------------ options / networks


def test_options_are_validated_with_argument_names() -> None:
    with pytest.raises(OptionError, match="^norm: 'group' is not one of none, batch, instance"):
        parse_options(norm="group")
    with pytest.raises(OptionError, match="^upsampling:"):
        parse_options(upsampling="pixelshuffle")
    with pytest.raises(OptionError, match="^dropout: must be in"):
        parse_options(dropout=1.5)
    with pytest.raises(OptionError, match="^depth: must be >= 1"):
        parse_options(depth=0)
    with pytest.raises(OptionError, match="^colour: unknown network option"):
        parse_options({"colour": 1})
    opts = parse_options({"norm": "INSTANCE", "upsampling": "resize-conv"})
    assert opts.norm.value == "instance" and opts.upsampling.value == "resize-conv"
    assert parse_options(opts.to_dict()) == opts


@pytest.mark.parametrize("net", [
    {"norm": "none"}, {"norm": "batch"}, {"norm": "instance", "upsampling": "resize-conv"},
    {"sobel": False}, {"context_slices": 1},
])
def test_unet_shapes(net: dict) -> None:
    opts = parse_options({**TINY, **net})
    model = build_network(opts).eval()
    x = torch.rand(2, opts.in_slices, 32, 24)
    assert model(x).shape == (2, 1, 32, 24)


def test_cyclegan_networks_shapes() -> None:
    from ml.networks import build_discriminator

    opts = parse_options(architecture="cyclegan", ngf=4, n_blocks=1, ndf=4)
    assert opts.architecture is Architecture.CYCLEGAN
    g = build_network(opts)
    y = g(torch.rand(1, 1, 64, 64))
    assert y.shape == (1, 1, 64, 64) and float(y.detach().min()) >= 0 and float(y.detach().max()) <= 1
    d = build_discriminator(opts)
    assert d(torch.rand(1, 1, 70, 70)).shape == (1, 1, 6, 6)  # 70x70 receptive field -> one 6x6 patch map


def test_default_cyclegan_matches_reference_sizes() -> None:
    opts = parse_options(architecture="cyclegan")
    assert (opts.ngf, opts.n_blocks, opts.ndf, opts.gen_norm.value, opts.padding.value) == (64, 9, 64, "instance", "reflect")


def test_sobel_layer_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((20, 17)).astype(np.float32)
    out = SobelLayer()(torch.from_numpy(img)[None, None])[0].numpy()
    np.testing.assert_allclose(out[0], ndimage.sobel(img, axis=1, mode="nearest"), atol=1e-5)
    np.testing.assert_allclose(out[1], ndimage.sobel(img, axis=0, mode="nearest"), atol=1e-5)


def test_sobel_channels_are_fed_to_the_network() -> None:
    opts = parse_options(TINY)
    model = build_network(opts)
    assert model.down[0][0].in_channels == 3  # image + Sobel x + Sobel y
    assert build_network(parse_options({**TINY, "sobel": False})).down[0][0].in_channels == 1
    assert build_network(parse_options({**TINY, "context_slices": 2})).down[0][0].in_channels == 7


# ------------------------------------------------------------------ data


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "P", "S"), ("P", "S", "R"), ("I", "L", "A")])
def test_reorientation_round_trip(codes: tuple[str, str, str]) -> None:
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    ornt = nib.orientations.axcodes2ornt(codes)
    affine = nib.orientations.inv_ornt_aff(nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS")), data.shape)
    affine = np.linalg.inv(affine) if nib.aff2axcodes(affine) != codes else affine
    assert nib.aff2axcodes(affine) == codes
    canon, caff = to_canonical(data, affine)
    assert nib.aff2axcodes(caff) == CANONICAL
    assert canon.shape == canonical_shape(data.shape, affine)
    # the same voxel is at the same world position
    world = affine @ np.array([1, 2, 3, 1.0])
    idx = np.rint(np.linalg.inv(caff) @ world).astype(int)[:3]
    assert canon[tuple(idx)] == data[1, 2, 3]
    np.testing.assert_array_equal(from_canonical(canon, affine), data)


def test_normalization_round_trip_and_mask() -> None:
    vol = _head()
    mask = head_mask(vol)
    assert 0.1 < mask.mean() < 0.9
    norm_vol, norm = normalize(vol, mask)
    assert abs(np.percentile(norm_vol[mask], 99.5) - 1.0) < 1e-3
    np.testing.assert_allclose(norm.invert(norm_vol), np.clip(vol, 0, None), rtol=1e-5, atol=1e-3)
    assert json.loads(json.dumps(norm.to_dict()))["high"] == pytest.approx(norm.high)


def test_nifti_reading_is_16_bit_safe(tmp_path: Path) -> None:
    raw = np.zeros((8, 8, 4), dtype=np.int16)
    raw[2:6, 2:6, :] = 3000
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(2.0, 10.0)
    nib.save(img, tmp_path / "v.nii.gz")
    vol = load_volume(tmp_path / "v.nii.gz")
    assert vol.data.dtype == np.float32 and float(vol.data.max()) == 6010.0
    with pytest.raises(DataError, match="no such file"):
        load_volume(tmp_path / "missing.nii.gz")


def test_dicom_series_reading(tmp_path: Path) -> None:
    from dicomgen import SeriesSpec, make_series, write_series

    datasets = make_series(SeriesSpec(slices=6, rows=32, cols=24))
    for ds in datasets:
        ds.RescaleSlope, ds.RescaleIntercept = 2, -5
    write_series(datasets, tmp_path / "series")
    vol = load_volume(tmp_path / "series")
    assert vol.data.shape == (24, 32, 6)  # (columns, rows, slices)
    first = datasets[0].pixel_array.astype(np.float32) * 2 - 5
    k0 = int(np.argmin([float(ds.ImagePositionPatient[2]) for ds in datasets]))
    np.testing.assert_array_equal(vol.data[:, :, 0], (datasets[k0].pixel_array.astype(np.float32) * 2 - 5).T)
    assert first.max() > 255  # stays 16-bit
    assert nib.aff2axcodes(vol.affine) == ("L", "P", "S")


def test_slice_stack_edges() -> None:
    vol = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
    s = slice_stack(vol, 0, 1)
    assert s.shape == (3, 2, 2)
    np.testing.assert_array_equal(s[0], vol[:, :, 0])
    np.testing.assert_array_equal(s[2], vol[:, :, 1])


def test_metrics_identity_and_baseline() -> None:
    t = _head()
    mask = head_mask(t)
    same = compare(t, t, mask)
    assert same["mse"] == 0 and same["ssim"] == pytest.approx(1.0) and same["ssim_masked"] == pytest.approx(1.0)
    noisy = compare(t + np.random.default_rng(0).normal(0, 50, t.shape), t, mask)
    assert 0 < noisy["psnr"] < 60 and noisy["ssim"] < 1
    assert unit_range(t, mask).max() == 1.0


# ------------------------------------------------------------------ checkpoints


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    ck = _tiny_checkpoint(tmp_path / "ck")
    state, meta, _ = load_checkpoint(ck)
    assert meta["direction"] == "t1-to-t2" and meta["format"] == 1 and "package_version" in meta
    model = load_model(ck, device="cpu")
    assert model.direction == "t1-to-t2" and model.output_max == 1000 and model.name == "tiny"
    assert model.window == (500.0, 1000.0)
    again = load_model(tmp_path / "ck" / "model.safetensors", device="cpu")
    assert again.identity == model.identity
    _tiny_checkpoint(tmp_path / "ck2", base_width=5)
    assert load_model(tmp_path / "ck2", device="cpu").identity != model.identity


def test_a_model_with_tissue_peak_targets_suggests_no_fixed_window(tmp_path: Path) -> None:
    # its output scale is 5 x the tissue peak, so most anatomy lies in the lowest fifth of [0, output_max]: a window
    # over [0, output_max] would show it nearly black; the series' own intensities set it (dicom_node.build)
    ck = _tiny_checkpoint(tmp_path / "ck")
    _, meta, _ = load_checkpoint(ck)
    meta = {k: v for k, v in meta.items() if not k.startswith("_")}
    write_metadata(ck, {**meta, "target_normalization": {"method": "tissue-peak", "span": 5.0}})
    assert load_model(ck, device="cpu").window is None
    write_metadata(ck, {**meta, "target_normalization": {"method": "percentile"}})
    assert load_model(ck, device="cpu").window == (500.0, 1000.0)


def test_checkpoint_fp16_storage(tmp_path: Path) -> None:
    opts = parse_options(TINY)
    net = build_network(opts)
    save_checkpoint(tmp_path / "h.safetensors", net.state_dict(),
                    {"network": opts.to_dict(), "direction": "t2-to-t1", "output_scale": 500.0}, half=True)
    m = load_model(tmp_path / "h.safetensors", device="cpu")
    assert m.direction == "t2-to-t1" and m.metadata["weights_dtype"] == "float16"


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is missing"):
        load_model(tmp_path / "nothing", device="cpu")


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    ck = _tiny_checkpoint(tmp_path / "ck")
    w = ck / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt") as err:
        load_model(ck, device="cpu")
    assert "\n" not in str(err.value)
    (ck / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(ck, device="cpu")


def test_corrupt_weights_without_hash(tmp_path: Path) -> None:
    ck = _tiny_checkpoint(tmp_path / "ck")
    meta = json.loads((ck / "model.json").read_text())
    del meta["weights_sha256"]
    (ck / "model.json").write_text(json.dumps(meta))
    (ck / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(ck, device="cpu")


def test_mismatched_checkpoint(tmp_path: Path) -> None:
    ck = _tiny_checkpoint(tmp_path / "ck")
    meta = json.loads((ck / "model.json").read_text())
    meta["network"]["base_width"] = 8
    (ck / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_model(ck, device="cpu")
    meta["network"]["base_width"] = 4
    meta["network"]["norm"] = "sparkly"
    (ck / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="norm"):
        load_model(ck, device="cpu")


def test_wrong_direction(tmp_path: Path) -> None:
    ck = _tiny_checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="is a t1-to-t2 model, not t2-to-t1"):
        load_model(ck, direction="t2-to-t1", device="cpu")
    with pytest.raises(ValueError, match="direction"):
        load_model(ck, direction="sideways", device="cpu")


# ------------------------------------------------------------------ inference


@pytest.mark.parametrize("shape", [(33, 27, 5), (16, 16, 3), (7, 50, 2)])
def test_synthesize_odd_sizes_and_dtype(tmp_path: Path, shape: tuple[int, int, int]) -> None:
    model = load_model(_tiny_checkpoint(tmp_path / "ck"), device="cpu")
    data = np.random.default_rng(1).random(shape).astype(np.float32) * 900
    out = synthesize(model, data, np.diag([-0.7, 0.7, 3.0, 1.0]), batch_size=2)
    assert out.shape == shape and out.dtype == np.uint16
    assert int(out.max()) <= model.output_max


def test_padding_is_cropped_back_exactly() -> None:
    """A network that returns its input shows that pad + crop restore every voxel in place."""
    opts = parse_options({**TINY, "sobel": False})

    class Echo(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert x.shape[-1] % opts.multiple == 0 and x.shape[-2] % opts.multiple == 0
            return x

    vol = np.random.default_rng(2).random((13, 10, 3)).astype(np.float32)
    np.testing.assert_array_equal(predict_normalized(Echo(), vol, opts, batch_size=2), vol)


def test_synthesize_is_deterministic_and_orientation_consistent(tmp_path: Path) -> None:
    model = load_model(_tiny_checkpoint(tmp_path / "ck"), device="cpu")
    data = _head((8, 40, 32))
    aff = np.diag([1.0, 1.0, 3.0, 1.0])  # RAS
    a = synthesize(model, data, aff, batch_size=3)
    b = synthesize(model, data, aff, batch_size=3)
    np.testing.assert_array_equal(a, b)
    # the same anatomy stored flipped (LAS) gives the same synthetic image, flipped back
    flipped_aff = aff.copy()
    flipped_aff[0, 0] = -1.0
    flipped_aff[0, 3] = data.shape[0] - 1
    c = synthesize(model, data[::-1].copy(), flipped_aff, batch_size=3)
    np.testing.assert_allclose(c[::-1].astype(int), a.astype(int), atol=1)


def test_ml_package_import_is_light() -> None:
    import subprocess
    import sys

    code = "import sys, ml; assert 'torch' not in sys.modules, 'ml imports torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
