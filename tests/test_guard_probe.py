"""The guard probe's reading of anomaly reports (benchmarks/guard_probe.py); its runs are the probe."""

from __future__ import annotations

import argparse

import pytest

from tests.conftest import load_benchmark


def _probe():
    return load_benchmark("guard_probe")


def test_rows_name_a_registered_attack_and_a_count():
    probe = _probe()
    assert probe.parse_row("sign-flip:3") == ("sign-flip", 3)
    assert probe.parse_row("none:0") == (None, 0)
    for bad in ("sign-flip", "sign-flip:x", "none:2", "sign-flip:0", "bogus:1"):
        with pytest.raises(argparse.ArgumentTypeError):
            probe.parse_row(bad)


def test_a_round_shows_every_attacker_and_the_honest_hospitals_it_did_not_fully_trust():
    report = {"round": 3, "flagged": ["a", "h1"], "verdicts": [
        {"client": "a", "flagged": True, "weight": 0.0, "confidence": 1.0,
         "p_values": {"crafted": 1e-9, "forecast": 0.3}},
        {"client": "h1", "flagged": True, "weight": 0.0, "confidence": 0.999,
         "p_values": {"intervention": 9e-5, "solo-ranking": 0.43}},
        {"client": "h2", "flagged": False, "weight": 0.5, "confidence": 0.97, "p_values": {"magnitude": 0.01}},
        {"client": "h3", "flagged": False, "weight": 1.0, "confidence": 0.2, "p_values": {"forecast": 0.04}},
    ]}
    lines = _probe().round_lines(report, ["a"], show_p=0.05)
    assert lines[0] == "round 3: flagged a, h1"
    assert len(lines) == 4 and not any("h3" in line for line in lines)
    assert "attacker" in lines[1] and "crafted=1e-09" in lines[1] and "forecast" not in lines[1]
    assert "FALSE +" in lines[2] and "intervention=9e-05" in lines[2] and "p 0.001" in lines[2]
    assert lines[3].split()[0] == "honest" and "weight 0.5" in lines[3]
