"""Research commands: ``dicomnode train`` / ``evaluate`` / ``predict``.

torch and the ``ml`` modules are imported inside the commands so that the
node's other commands start fast.  Bad input (missing data, bad checkpoint,
bad option, bad config) prints one line and exits with status 2.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from dicom_node.cli_errors import UsageFailure
from vocab import DIRECTIONS, Direction

if TYPE_CHECKING:
    from dicom_node.config import ModelConfig

__all__ = ["COMMANDS", "MLUsageError"]

log = logging.getLogger(__name__)


MLUsageError = UsageFailure  # the CLI's one usage error (kept under this name for importers)


def _fail(message: str) -> NoReturn:
    raise MLUsageError(message)


def _setup_logging() -> None:
    """Configure logging when the main CLI group has not (commands used on their own)."""
    from dicom_node.logsetup import configure

    configure("INFO", keep_existing=True)


def _model_config(config: Path) -> ModelConfig:
    """``[model]`` of the node configuration; a bad file is one line on stderr and exit code 2."""
    from dicom_node.config import ConfigError, load_config

    try:
        return load_config(config).model
    except ConfigError as exc:
        click.echo(str(exc).replace("\n", " "), err=True)
        sys.exit(2)


def _config_device(config: Path | None, device: str | None) -> str:
    """--device, else ``model.device`` from --config, else ``auto``."""
    if device:
        return device
    return "auto" if config is None else str(_model_config(config).device)


def _config_checkpoint(config: Path | None, checkpoint: str | None) -> str:
    """--checkpoint, else ``model.checkpoint`` from --config, else ``default``."""
    if checkpoint:
        return checkpoint
    return "default" if config is None else str(_model_config(config).checkpoint)


def _config_engine(config: Path | None, engine: str | None) -> str:
    """--engine, else ``model.engine`` from --config, else ``auto``."""
    if engine:
        return engine
    return "auto" if config is None else str(_model_config(config).engine)


def _load(checkpoint: str, direction: str | None, device: str, engine: str = "auto") -> Any:
    from ml.checkpoint import CheckpointError
    from ml.inference import load_model

    try:
        return load_model(checkpoint, direction=direction, device=device, engine=engine)
    except (CheckpointError, ValueError) as exc:
        _fail(str(exc))


def _progress() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), transient=False)


_config_option = click.option("--config", "config", type=click.Path(path_type=Path), default=None,
                              help="Node configuration file (model.device / model.checkpoint defaults).")
_DIRECTIONS = click.Choice(list(DIRECTIONS))
_DEVICE_HELP = "auto, cpu, cuda, cuda:N (default: config model.device, else auto: CUDA when present)."
_ENGINE_HELP = "auto (ONNX Runtime on CPU, torch on CUDA), torch, onnxruntime (default: config model.engine, else auto)."


@click.command("train")
@click.option("--model", type=click.Choice(["unet", "cyclegan"]), default="unet", show_default=True)
@click.option("--direction", type=_DIRECTIONS, default=Direction.T1_TO_T2.value, show_default=True,
              help="For a CycleGAN both directions are trained; this one is the default when loading.")
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Folder of subjects with T1 and T2.")
@click.option("--val-subjects", multiple=True, help="Subject folder names held out for validation (repeatable or comma-separated).")
@click.option("--exclude-subjects", multiple=True, help="Subject folder names not used at all.")
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Default 1e-3 (U-Net), 2e-4 (CycleGAN).")
@click.option("--device", default=None, help=_DEVICE_HELP)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Checkpoint folder (written every epoch).")
@click.option("--resume", is_flag=True, help="Continue the training saved in --out.")
@click.option("--crop", type=click.IntRange(min=16), default=128, show_default=True, help="Training patch size.")
@click.option("--steps-per-epoch", type=click.IntRange(min=1), default=None, help="Default: one pass over the training slices.")
@click.option("--network", "network_json", default=None,
              help='Network options as JSON, e.g. \'{"base_width": 12, "depth": 4, "norm": "batch", '
                   '"upsampling": "resize-conv", "sobel": true, "context_slices": 1, "dropout": 0.1}\'.')
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-augment", is_flag=True, help="Disable flips / affine / intensity augmentation.")
@click.option("--mri-augment", is_flag=True,
              help="Also simulate thick-slice 2-D acquisitions from 1 mm subjects, bias fields and noise.")
@click.option("--loss", type=click.Choice(["l1", "l1+ssim"]), default="l1", show_default=True,
              help="U-Net training loss: L1, or L1 + w * (1 - SSIM).")
@click.option("--ssim-weight", type=click.FloatRange(min=0), default=1.0, show_default=True, help="w of --loss l1+ssim.")
@click.option("--input-norm", type=click.Choice(["percentile", "tissue-peak"]), default="percentile", show_default=True,
              help="Input scaling: 99.5th percentile in the head mask, or the main tissue peak (harmonises "
                   "skull-stripped and whole-head scans).")
@click.option("--target-norm", type=click.Choice(["percentile", "tissue-peak"]), default="percentile",
              show_default=True, help="Target scaling: 99.5th percentile in the head mask, or the main tissue peak "
                                      "(the same tissue scale whether the scan is skull-stripped or whole-head).")
@click.option("--sampling", type=click.Choice(["slices", "subjects"]), default="slices", show_default=True,
              help="U-Net: what each epoch draws equally often: every training slice (a 1 mm subject weighs 3-4 "
                   "clinical thick-slice scans), or every training subject.")
@click.option("--folds", type=click.IntRange(min=0), default=None, is_flag=False, flag_value=0,
              help="Subject-wise K-fold cross-validation: one model per fold in OUT/fold-<i>/ "
                   "(--folds alone or 0: leave one patient out).")
@click.option("--fold", "only_folds", type=click.IntRange(min=1), multiple=True,
              help="With --folds: train only this fold (repeatable), e.g. one fold per machine.")
@click.option("--time-budget", type=click.FloatRange(min=0, min_open=True), default=None, metavar="MINUTES",
              help="Stop cleanly after this many minutes with a resumable state (continue with --resume).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="U-Net arithmetic: auto = fp16 mixed precision on CUDA, bf16 on a CPU that computes it natively "
                   "(AMX / AVX512-BF16), else fp32. A resumed run may change it.")
@click.option("--init-from", type=click.Path(path_type=Path), default=None,
              help="U-Net: start from this checkpoint's weights (a new optimizer and schedule): fine-tuning, or "
                   "continuing a model whose resume state is gone. With --folds: a folder of fold-<i>/ checkpoints "
                   "(or PATH-fold-<i>.safetensors, as in ml/weights/cv), each trained without its fold's held-out "
                   "subjects. A larger base_width in --network (nothing else changed) widens the checkpoint's U-Net "
                   "at its function (ml/widen.py).")
@click.option("--force", is_flag=True, help="Start afresh even if --out already holds a training.")
@click.option("--name", default=None, help="Model name stored in the checkpoint (default dicomnode-<model>-<direction>).")
@click.option("--version", "model_version", default="1", show_default=True, help="Model version stored in the checkpoint.")
@click.option("--val-every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Validate every N epochs (and after the last).")
@_config_option
def train_command(model: str, direction: str, data: Path, val_subjects: tuple[str, ...], exclude_subjects: tuple[str, ...],
                  epochs: int, batch_size: int, lr: float | None, device: str | None, out: Path, resume: bool, crop: int,
                  steps_per_epoch: int | None, network_json: str | None, seed: int, no_augment: bool, mri_augment: bool,
                  loss: str, ssim_weight: float, input_norm: str, target_norm: str, sampling: str, folds: int | None, only_folds: tuple[int, ...],
                  time_budget: float | None, precision: str, init_from: Path | None, force: bool, name: str | None,
                  model_version: str,
                  val_every: int, config: Path | None) -> None:
    """Train a U-Net (paired) or a CycleGAN (unpaired) T1<->T2 model; works under torchrun."""
    _setup_logging()
    dev = _config_device(config, device)
    from ml.data import DataError
    from ml.networks import OptionError
    from ml.train import TrainConfig, TrainError, train

    network: dict[str, Any] = {}
    if network_json:
        try:
            network = json.loads(network_json)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not valid JSON ({exc})", param_hint="--network") from None
        if not isinstance(network, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--network")

    def split(values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(v.strip() for item in values for v in item.split(",") if v.strip())

    if only_folds and folds is None:
        raise click.BadParameter("needs --folds", param_hint="--fold")
    # with --fold, only those folds' folders count: another process may be training the other folds in OUT
    targets = [out / f"fold-{k}" for k in only_folds] if only_folds else [out]
    held = next((t for t in targets if t.is_dir() and any(t.iterdir())), None)
    if held is not None and not (resume or force):
        _fail(f"--out: {held} already holds a training; add --resume to continue it or --force to start afresh")
    if force and not resume:
        from ml.train_folds import remove_training

        for t in targets:  # only what a training writes there; anything else in the folder stays
            if t.is_dir():
                remove_training(t)
    cfg = TrainConfig(model=model, direction=direction, data=data, out=out, val_subjects=split(val_subjects),
                      exclude_subjects=split(exclude_subjects), epochs=epochs, batch_size=batch_size, lr=lr, device=dev,
                      resume=resume, crop=crop, steps_per_epoch=steps_per_epoch, seed=seed, network=network,
                      augment=not no_augment, mri_augment=mri_augment, loss=loss, ssim_weight=ssim_weight,
                      input_norm=input_norm, target_norm=target_norm, sampling=sampling, time_budget=time_budget, val_every=val_every,
                      name=name, version=model_version, precision=precision, init_from=init_from)
    from ml.train_folds import train_folds

    try:
        results = [train(cfg)] if folds is None else train_folds(cfg, folds or None, only=only_folds)
    except (DataError, OptionError, TrainError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        click.echo(f"interrupted; continue with: dicomnode train ... --out {out} --resume", err=True)
        sys.exit(130)
    for r in results:
        state = "finished" if r.finished else f"stopped by --time-budget at epoch {r.epochs_completed + 1}, step {r.step_in_epoch}"
        click.echo(f"checkpoint written to {r.out} ({state})")
    if not all(r.finished for r in results):
        click.echo(f"continue with: dicomnode train ... --out {out} --resume", err=True)
        sys.exit(3)


@click.command("evaluate")
@click.option("--checkpoint", default=None, help='Checkpoint folder or file, or "default" (the shipped model).')
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Folder of subjects with T1 and T2.")
@click.option("--direction", type=_DIRECTIONS, default=None, help="Needed for default / CycleGAN checkpoints.")
@click.option("--subjects", multiple=True, help="Only these subject folders (repeatable).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write all figures as JSON.")
@click.option("--png", "png_dir", type=click.Path(path_type=Path), default=None, help="Folder for one PNG per subject.")
@click.option("--device", default=None, help=_DEVICE_HELP)
@click.option("--engine", type=click.Choice(["auto", "torch", "onnxruntime"]), default=None, help=_ENGINE_HELP)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--folds", type=click.IntRange(min=0), default=None, is_flag=False, flag_value=0,
              help="--checkpoint is a cross-validation folder (dicomnode train --folds): evaluate each "
                   "CHECKPOINT/fold-<i> on its own held-out subjects (--folds alone: every fold found).")
@_config_option
def evaluate_command(checkpoint: str | None, data: Path, direction: str | None, subjects: tuple[str, ...],
                     json_out: Path | None, png_dir: Path | None, device: str | None, batch_size: int,
                     engine: str | None, folds: int | None, config: Path | None) -> None:
    """Per-subject and mean figures for the model, two baselines and two "nearly perfect" references:
    the quality metric (PSNR / SSIM on the eroded nonzero mask) and MSE/MAE/PSNR/SSIM (whole and masked)."""
    _setup_logging()
    dev = _config_device(config, device)
    eng = _config_engine(config, engine)
    ckpt = _config_checkpoint(config, checkpoint)
    from ml.data import DataError
    from ml.evaluate import evaluate, evaluate_folds, fold_checkpoints

    if folds is not None:
        if subjects:
            raise click.BadParameter("the folds choose the subjects; leave out --subjects", param_hint="--folds")
        try:
            paths = fold_checkpoints(Path(ckpt), folds or None)
        except DataError as exc:
            _fail(str(exc))
        models = [(p.name, _load(str(p), direction, dev, eng)) for p in paths]
        try:
            result = evaluate_folds(models, data, png_dir=png_dir, batch_size=batch_size,
                                    progress=lambda name: log.info("evaluate %s", name))
        except DataError as exc:
            _fail(str(exc))
        _report(result, json_out)
        return
    model = _load(ckpt, direction, dev, eng)
    try:
        from ml.data import discover_paired

        n = len(subjects) if subjects else len(discover_paired(data))
        with _progress() as prog:
            task = prog.add_task("evaluate", total=n)
            seen: list[str] = []

            def step(name: str) -> None:
                if seen:
                    prog.advance(task)
                seen.append(name)
                prog.update(task, description=f"evaluate {name}")

            result = evaluate(model, data, subjects=subjects or None, png_dir=png_dir, batch_size=batch_size, progress=step)
            prog.update(task, completed=n)
    except DataError as exc:
        _fail(str(exc))
    _report(result, json_out)


def _report(result: dict[str, Any], json_out: Path | None) -> None:
    from ml.evaluate import METHODS, write_json

    _print_result(result, METHODS)
    if json_out is not None:
        write_json(result, json_out)
        click.echo(f"figures written to {json_out}")


def _print_result(result: dict[str, Any], methods: tuple[str, ...]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    click.echo(f"{result['checkpoint']} ({result['direction']}) on {result['data']}")
    click.echo(f"normalization: {result['normalization']}")
    click.echo(f"mask: {result['mask']}")
    click.echo(f"DICOM-paper figures: {result['paper_metrics']}")
    click.echo(f"{result['quality_metric']}")
    from ml.evaluate import REFERENCES

    cols = [*methods, *REFERENCES]
    quality_table = Table("subject", *(f"{c}\nPSNR / SSIM" for c in cols), "QC", title="quality metric")
    qrows = list(result["subjects"].items())
    if result["mean_held_out"]:
        qrows.append(("MEAN held out", result["mean_held_out"]))
        qrows.append(("SD held out", result.get("sd_held_out") or {}))
    for name, r in qrows:
        label = name + (f" ({r['fold']})" if isinstance(r.get("fold"), str) else
                        "" if not isinstance(r.get("held_out"), bool) else (" (held out)" if r["held_out"] else " (train)"))
        cells = []
        for c in cols:
            m = r.get(c) or {}
            cells.append(f"{m['q_psnr']:.2f} / {m['q_ssim']:.3f}" if "q_psnr" in m else "")
        qc = r.get("qc") or {}
        flip = ((qc.get("checks") or {}).get("flip_disagreement") or {}).get("value")
        quality_table.add_row(label, *cells, (f"{qc['verdict']}" + (f" (flip {flip:.3f})" if flip is not None else ""))
                              if qc else "")
    console.print(quality_table)
    table = Table("subject", "method", "PSNR", "SSIM", "MSE", "MAE", "PSNR mask", "SSIM mask", "MSE mask", "MAE mask",
                  "paper MSE", "paper MAE", "paper PSNR")
    rows = [(n, r) for n, r in result["subjects"].items()]
    if result["mean"]:
        rows.append(("MEAN (all)", result["mean"]))
    if result["mean_held_out"] and len(result["held_out_subjects"]) != len(result["subjects"]):
        rows.append(("MEAN (held out)", result["mean_held_out"]))
    for name, r in rows:
        label = name + ("" if not isinstance(r.get("held_out"), bool) else (" (held out)" if r["held_out"] else " (train)"))
        for method in methods:
            m = r[method]
            table.add_row(label, method, f"{m['psnr']:.2f}", f"{m['ssim']:.3f}", f"{m['mse']:.4f}", f"{m['mae']:.4f}",
                          f"{m.get('psnr_masked', float('nan')):.2f}", f"{m.get('ssim_masked', float('nan')):.3f}",
                          f"{m.get('mse_masked', float('nan')):.4f}", f"{m.get('mae_masked', float('nan')):.4f}",
                          f"{m['paper_mse']:.4f}", f"{m['paper_mae']:.4f}", f"{m['paper_psnr']:.2f}")
            label = ""
    console.print(table)


@click.command("predict")
@click.option("--checkpoint", default=None, help='Checkpoint folder or file, or "default" (the shipped model).')
@click.option("--input", "input_path", type=click.Path(path_type=Path), required=True, help="NIfTI file or DICOM series folder.")
@click.option("--output", type=click.Path(path_type=Path), required=True, help="Output NIfTI (.nii or .nii.gz), uint16.")
@click.option("--direction", type=_DIRECTIONS, default=None, help="Needed for default / CycleGAN checkpoints (default t1-to-t2).")
@click.option("--device", default=None, help=_DEVICE_HELP)
@click.option("--engine", type=click.Choice(["auto", "torch", "onnxruntime"]), default=None, help=_ENGINE_HELP)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@_config_option
def predict_command(checkpoint: str | None, input_path: Path, output: Path, direction: str | None, device: str | None,
                    engine: str | None, batch_size: int, config: Path | None) -> None:
    """Synthesize the other contrast of one volume, offline."""
    _setup_logging()
    if not output.name.endswith((".nii", ".nii.gz")):
        raise click.BadParameter("must end with .nii or .nii.gz", param_hint="--output")
    dev = _config_device(config, device)
    ckpt = _config_checkpoint(config, checkpoint)
    from ml.data import DataError, load_volume

    try:
        vol = load_volume(input_path)
    except DataError as exc:
        _fail(str(exc))
    model = _load(ckpt, direction, dev, _config_engine(config, engine))
    import nibabel as nib
    import numpy as np

    from ml.inference import synthesize

    from ml.data import canonical_shape

    nz = canonical_shape(vol.data.shape, vol.affine)[2]
    with _progress() as prog:
        task = prog.add_task(f"predict {model.direction}", total=nz)
        out = synthesize(model, vol.data, vol.affine, batch_size=batch_size,
                         progress=lambda n: prog.advance(task, n))
        prog.update(task, completed=nz)
    img = nib.Nifti1Image(out, vol.affine)  # type: ignore[no-untyped-call]
    img.header.set_data_dtype(np.uint16)  # type: ignore[no-untyped-call]
    img.header["descrip"] = f"synthetic {model.target} {model.identity}"[:79].encode()
    img.header["cal_min"], img.header["cal_max"] = 0, model.output_max
    output.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(output))
    click.echo(f"{output}: synthetic {model.target}, uint16 in [0, {model.output_max}], model {model.identity}")


COMMANDS: list[click.Command] = [train_command, evaluate_command, predict_command]
