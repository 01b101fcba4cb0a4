"""Source-free onboarding: `causalfed adapt` (the prevalence maths: tests/test_calibration.py)."""

from __future__ import annotations

import torch

from client.adapt import adapt_features, prototype_pseudo_labels


def test_pseudo_labels_follow_the_nearest_prototype():
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    probabilities = torch.tensor([0.2, 0.4, 0.9, 0.6])
    assert prototype_pseudo_labels(features, probabilities).tolist() == [0.0, 0.0, 1.0, 1.0]


def test_adaptation_keeps_the_head_and_moves_the_features(small_scenario):
    from client.task import new_model
    from simulations.datasets import build_site

    model = new_model(seed=0)
    head = [p.clone() for p in model.head.parameters()]
    features = [p.clone() for p in model.features.parameters()]
    images = build_site(small_scenario, 4).train.images
    result = adapt_features(model, images, epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(head, model.head.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(features, model.features.parameters()))
    assert result.mean_entropy_after < result.mean_entropy_before


def test_cli_adapts_and_explains_bad_input(small_scenario, tmp_path):
    from typer.testing import CliRunner

    from cli.main import cli
    from simulations.datasets import build_site
    from simulations.runner import run_scenario

    run_scenario(small_scenario, run_dir=tmp_path)
    build_site(small_scenario, 4).save(tmp_path / "new.npz")
    build_site(small_scenario, 0).save(tmp_path / "known.npz")  # a federation hospital's own images

    def adapt(site: str, *options: str):
        arguments = ["adapt", str(tmp_path / "model.pt"), str(tmp_path / site), "--out", str(tmp_path / "adapted.pt")]
        return CliRunner().invoke(cli, [*arguments, "--epochs", "1", *options])

    result = adapt("new.npz")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "adapted.pt").is_file() and "test AUROC" in result.output
    assert "feature shift from the federation" in result.output
    known = adapt("known.npz")
    assert known.exit_code == 0 and "left unchanged" in known.output, known.output
    assert all(torch.equal(a, b) for a, b in zip(torch.load(tmp_path / "model.pt").values(),
                                                 torch.load(tmp_path / "adapted.pt").values()))
    forced = adapt("known.npz", "--always")
    assert forced.exit_code == 0 and "left unchanged" not in forced.output
    # Two rounds leave the model's scores flat: the estimate is refused, and the output says why.
    assert "estimated prevalence" in forced.output or "is used, because" in forced.output, forced.output
    from cli.output import UserError

    missing = CliRunner().invoke(cli, ["adapt", str(tmp_path / "model.pt"), str(tmp_path / "none.npz"), "--out", "x.pt"])
    assert isinstance(missing.exception, UserError) and "not found" in str(missing.exception)
    no_reference = adapt("new.npz", "--reference", str(tmp_path / "none.json"))
    assert isinstance(no_reference.exception, UserError) and "--reference" in str(no_reference.exception)
