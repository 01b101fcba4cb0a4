"""The command line as a user meets it: one-line errors with exit 2, no traceback and no
secret ever printed, preflight before any run folder, a log verify that says what changed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.provenance.records import private_pem, public_pem

REPO = Path(__file__).resolve().parents[1]


def causalfed(*args: str, cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(("args", "expected"), [
    (["simulate", "--engine", "inproces"], "invalid option --engine: 'inproces' is not one of"),
    (["simulate", "--rounds", "0"], "invalid option --rounds"),
    (["simulate", "--config", "nope"], "no scenario file or built-in named 'nope'"),
    (["log", "verify"], "Missing argument 'RUN'"),
    (["explain", "runs/none", "--site", "x"], "runs/none has no scenario.json"),
])
def test_user_errors_are_one_line_naming_the_option_or_file(args, expected):
    assert expected in _one_error_line(causalfed(*args))


def test_a_path_that_exists_is_a_scenario_file_whatever_its_suffix(tmp_path):
    binary = tmp_path / "binary.bin"
    binary.write_bytes(bytes(range(256)))
    line = _one_error_line(causalfed("simulate", "--config", str(binary), "--out", str(tmp_path)))
    assert str(binary) in line and "cannot read" in line
    typo = tmp_path / "typo.cfg"
    typo.write_text('name = "x"\n[data]\n[[data.sites]]\nname = "a"\nprevalance = 0.3\n[[data.sites]]\nname = "b"\n')
    result = causalfed("simulate", "--config", str(typo), "--out", str(tmp_path))
    assert result.returncode == 2 and "data.sites.0.prevalance: Extra inputs are not permitted" in result.stderr
    assert "Tuple should have at least" not in result.stderr  # not a problem of its own
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_a_private_key_given_as_the_public_one_is_refused_without_a_byte_of_it(tmp_path):
    key = Ed25519PrivateKey.generate()
    secret = tmp_path / "server_ed25519.pem"
    secret.write_bytes(private_pem(key))
    log = tmp_path / "run" / "provenance"
    log.mkdir(parents=True)
    (log / "log.jsonl").write_text("")
    body = private_pem(key).decode().splitlines()[1]  # the base64 key material
    for args in (["log", "verify", str(tmp_path / "run"), "--public-key", str(secret)],
                 ["log", "check-proof", str(secret), "--checkpoints", str(secret), "--public-key", str(secret)]):
        result = causalfed(*args)
        line = _one_error_line(result)
        assert "private key" in line
        for fragment in (body, body[:16], body[-16:]):
            assert fragment not in result.stdout + result.stderr


def test_unexpected_errors_point_to_a_log_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    key = tmp_path / "public.pem"
    key.write_bytes(public_pem(Ed25519PrivateKey.generate().public_key()))
    kept = tmp_path / "kept.jsonl"
    kept.write_text("not json\n")
    result = causalfed("log", "check-proof", str(bad), "--checkpoints", str(kept), "--public-key", str(key),
                       cwd=tmp_path)
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode in (1, 2), result.stderr


@pytest.mark.parametrize(("name", "edit", "finding"), [
    ("a flipped byte", lambda lines: [lines[0], lines[1].replace(b'"round":1', b'"round":7'), *lines[2:]],
     "record 1 modified"),
    ("a dropped record", lambda lines: [lines[0], *lines[2:]], "record 1 missing"),
])
def test_log_verify_leads_with_one_line_per_finding(small_run, tmp_path, name, edit, finding):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    path = run / "provenance" / "log.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in edit(path.read_bytes().splitlines())))
    result = causalfed("log", "verify", str(run))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0] == f"TAMPERED: {finding}", result.stdout
    assert "--verbose lists them" in result.stdout
    verbose = causalfed("log", "verify", str(run), "--verbose")
    assert len(verbose.stdout.splitlines()) > len(lines)


def test_check_data_names_the_file_and_array(tmp_path):
    from common.data import SPLITS

    arrays = {f"{s}_images": np.zeros((4, 1, 28, 28), np.float32) for s in SPLITS}
    arrays |= {f"{s}_labels": np.array([0, 1, 0, 1]) for s in SPLITS}
    good = tmp_path / "good.npz"
    np.savez(good, **arrays)
    assert causalfed("check-data", str(good)).returncode == 0
    arrays["val_images"] = arrays["val_images"].copy()
    arrays["val_images"][0, 0, 0, 0] = np.nan
    nan = tmp_path / "nan.npz"
    np.savez(nan, **arrays)
    assert "array 'val_images' holds 1 NaN" in _one_error_line(causalfed("check-data", str(nan)))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    assert str(truncated) in _one_error_line(causalfed("check-data", str(truncated)))


def test_scenarios_say_what_each_shows_and_every_option_has_help():
    listed = causalfed("scenarios").stdout
    assert "default: Four hospitals" in listed and "[attack]" in listed
    for command in ("simulate", "adapt", "explain", "check-data", "export-sites", "certs", "log verify", "log prove",
                    "log check-proof"):
        text = causalfed(*command.split(), "--help").stdout
        options = [line for line in text.splitlines() if line.strip().startswith(("--", "│ --", "│ *"))]
        assert all(len(line.split("  ")) > 1 for line in options), (command, options)


@pytest.mark.timeout(300)
def test_ctrl_c_says_how_to_resume_and_a_bad_hospital_leaves_nothing_behind(tmp_path):
    config = tmp_path / "slow.toml"
    raw = (REPO / "common" / "scenarios" / "default.toml").read_text().replace("num_rounds = 20", "num_rounds = 200")
    config.write_text(raw.replace('name = "default"', 'name = "slow"'))
    process = subprocess.Popen([sys.executable, "-m", "cli", "simulate", "--config", str(config), "--out",
                                str(tmp_path / "runs"), "--no-baseline"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        runs = list((tmp_path / "runs").glob("slow-*/server-state.npz"))
        if runs:
            break
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "continue with: causalfed simulate --resume" in err and "Traceback" not in err
    missing = tmp_path / "missing.toml"
    missing.write_text(raw.replace('source = "synthetic"', 'source = "medmnist"\nmedmnist_file = "/nowhere.npz"')
                       .replace('name = "default"', 'name = "missing"'))
    result = causalfed("simulate", "--config", str(missing), "--out", str(tmp_path / "fresh"))
    assert "/nowhere.npz" in _one_error_line(result)
    assert not (tmp_path / "fresh").exists() or not list((tmp_path / "fresh").iterdir())
