"""``causalfed adapt``: the printing side (the maths is ``client/adapt.py``)."""

from __future__ import annotations

from pathlib import Path

from cli.output import UserError, console
from common.calibration import CALIBRATION_FILE, read_calibration


def _reference_moments(model_path: Path, explicit: Path | None):
    """The federation's feature moments: the given file (which must exist) or the run's own."""
    from common.feature_shift import FEATURE_MOMENTS_FILE, FeatureMoments

    if explicit is not None:
        if not explicit.is_file():
            raise UserError(f"--reference {explicit}: file not found")
        try:
            return FeatureMoments.load(explicit)
        except ValueError as error:
            raise UserError(f"--reference {explicit}: {error}") from None
    beside = model_path.with_name(FEATURE_MOMENTS_FILE)
    return FeatureMoments.load(beside) if beside.is_file() else None


def _run_calibration(model_path: Path) -> tuple[tuple[float, float] | None, float | None]:
    """The model's calibration and the federation's prevalence, from calibration.json
    beside it (None, None without one)."""
    path = model_path.with_name(CALIBRATION_FILE)
    if not path.is_file():
        return None, None
    try:
        return read_calibration(path)
    except ValueError as error:
        raise UserError(str(error)) from None


def _load_model(model_path: Path, input_shape):
    import torch

    from client.models import model_for_state

    if not model_path.is_file():
        raise UserError(f"{model_path}: file not found")
    try:
        state = torch.load(model_path)
        return model_for_state(state, input_shape=input_shape)
    except Exception:  # noqa: BLE001 - any unreadable model file is the user's to fix
        raise UserError(f"{model_path}: not a model saved by causalfed (model.pt of a run)") from None


def run_adapt(model_path: Path, site_file: Path, *, out: Path, source_prevalence: float | None, epochs: int,
              reference: Path | None, min_shift: float, always: bool) -> None:
    import numpy as np
    import torch

    from client.adapt import onboard
    from client.task import evaluate
    from common.data import SiteData, SiteDataError

    try:
        site = SiteData.load(site_file)
    except SiteDataError as error:
        raise UserError(str(error)) from None
    model = _load_model(model_path, site.train.input_shape)
    moments = None if always else _reference_moments(model_path, reference)
    calibration, run_prevalence = _run_calibration(model_path)
    prevalence = source_prevalence if source_prevalence is not None else run_prevalence
    images = np.concatenate([site.train.images, site.val.images, site.test.images])
    before = evaluate(model, site.test)["auroc"] if len(set(site.test.labels)) == 2 else None
    if moments is None and not always:
        console.print("[yellow]no federation feature moments beside the model: adapting without the shift check[/yellow]")
    try:
        result = onboard(model, images, reference=moments, min_shift=min_shift, calibration=calibration,
                         source_prevalence=prevalence if prevalence is not None else 0.5, epochs=epochs)
    except ValueError as error:  # e.g. moments of another model
        raise UserError(f"--reference: {error}") from None
    torch.save(model.state_dict(), out)
    if result.shift is not None:
        console.print(f"feature shift from the federation: {result.shift:.3f} (adapt at >= {min_shift:g})")
    estimate = result.prevalence
    if estimate.fallback:
        console.print(f"[yellow]prevalence: the federation's {estimate.value:.3f} is used, because "
                      f"{estimate.fallback}[/yellow]")
    else:
        console.print(f"estimated prevalence {estimate.value:.3f} ({estimate.method})")
    if not result.adapted:
        console.print(f"left unchanged: the model sees these images as it saw the federation's; model copied to {out}")
    else:
        console.print(f"mean prediction entropy {result.mean_entropy_before:.3f} -> {result.mean_entropy_after:.3f}; "
                      f"adapted model: {out}")
    if before is not None:  # labels, if the file has them, only score the result
        console.print(f"test AUROC (labels used for scoring only): {before:.3f} -> {evaluate(model, site.test)['auroc']:.3f}")
