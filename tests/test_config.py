"""Scenario files: the default loads, and every kind of mistake gets a message that says where."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from common.config import ScenarioError, builtin_scenarios
from simulations.scenario import load_scenario, parse_scenario


def _raw(**changes):
    raw = load_scenario().model_dump(mode="json")
    for dotted, value in changes.items():
        target = raw
        *path, last = dotted.split("__")
        for part in path:
            target = target[int(part)] if part.isdigit() else target[part]
        target[last] = value
    return raw


def test_default_scenario_is_five_hospitals_with_one_reversed_heldout():
    scenario = load_scenario()
    assert len(scenario.data.sites) == 5
    heldout = [s for s in scenario.data.sites if s.role == "heldout"]
    assert len(heldout) == 1 and heldout[0].correlation < 0.5
    assert sorted(s.correlation for s in scenario.data.train_sites) == [0.6, 0.7, 0.8, 0.9]
    assert scenario.federation.num_rounds == 20


def test_builtins_all_load():
    assert "default" in builtin_scenarios()
    for name in builtin_scenarios():
        assert load_scenario(name).name


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data__sites__0__correlation": 1.5}, "data.sites.0.correlation"),
        ({"data__sites__1__name": "hospital-A"}, "site names must be unique"),
        ({"data__label_noise": 0.7}, "data.label_noise"),
        ({"data__confounders": ["tag", "tattoo"]}, "data.confounders"),
        ({"data__confounders": ["tag", "tag"]}, "listed twice"),
        ({"training__objective": "magic"}, "unknown objective 'magic'"),
        ({"training__objective_params": {"penalty_weight": -1}}, "penalty_weight"),
        ({"training__objective_params": {"typo_weight": 1}}, "typo_weight"),
        ({"federation__num_rounds": 0}, "federation.num_rounds"),
        ({"data__source": "medmnist"}, "needs medmnist_file"),
        ({"data__sites__0__prevalence": 0.0}, "data.sites.0.prevalence"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_scenarios_name_the_problem(changes, message):
    with pytest.raises(ScenarioError) as error:
        parse_scenario(_raw(**changes), origin="test")
    assert message in str(error.value)
    assert "invalid scenario test" in str(error.value)


def test_needs_two_training_sites():
    raw = _raw()
    raw["data"]["sites"] = [raw["data"]["sites"][0], raw["data"]["sites"][4]]
    with pytest.raises(ScenarioError, match="at least 2 sites with role = 'train'"):
        parse_scenario(raw)


def test_file_errors(tmp_path: Path):
    with pytest.raises(ScenarioError, match="not found"):
        load_scenario(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(broken)
    with pytest.raises(ScenarioError, match="no scenario file or built-in named 'nope'"):
        load_scenario("nope")


def test_toml_file_roundtrip(tmp_path: Path):
    path = tmp_path / "two.toml"
    path.write_text(textwrap.dedent("""
        name = "two"
        [data]
        confounders = ["tag"]
        [[data.sites]]
        name = "a"
        correlation = 0.9
        [[data.sites]]
        name = "b"
        correlation = 0.7
        [training]
        objective = "erm"
    """))
    scenario = load_scenario(path)
    assert scenario.data.confounders == ("tag",)
    assert scenario.digest() == load_scenario(path).digest()
    assert scenario.without_shortcuts().data.sites[0].correlation == 0.5
