"""The provenance log: RFC 6962 vectors, crash safety, and a tamper suite that must catch everything."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.provenance.log import CHECKPOINT_FILE, LOG_FILE, ProvenanceLog, load_or_create_key
from common.provenance.merkle import (
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)
from common.provenance.verify import check_proof, prove_round, read_checkpoints, verify_log
from tests.conftest import shared_data_dir

VECTORS = shared_data_dir() / "merkle_vectors"
KEY = Ed25519PrivateKey.generate()


def _b64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _vectors(kind: str) -> list[Path]:
    files = sorted((VECTORS / kind).rglob("*.json"))
    return files or [pytest.param(None, marks=pytest.mark.skip(reason=f"no vectors at {VECTORS}"))]


@pytest.mark.parametrize("path", _vectors("inclusion"), ids=lambda p: str(p and p.relative_to(VECTORS)))
def test_inclusion_vectors(path):
    vector = json.loads(path.read_text())
    arguments = dict(
        leaf=_b64(vector["leafHash"]), index=vector["leafIdx"], tree_size=vector["treeSize"],
        proof=[_b64(p) for p in vector["proof"] or []], root=_b64(vector["root"]),
    )
    if vector["wantErr"]:
        with pytest.raises(ProofError):
            verify_inclusion(**arguments)
    else:
        verify_inclusion(**arguments)


@pytest.mark.parametrize("path", _vectors("consistency"), ids=lambda p: str(p and p.relative_to(VECTORS)))
def test_consistency_vectors(path):
    vector = json.loads(path.read_text())
    arguments = dict(
        old_size=vector["size1"], new_size=vector["size2"], old_root=_b64(vector["root1"]),
        new_root=_b64(vector["root2"]), proof=[_b64(p) for p in vector["proof"] or []],
    )
    if vector["wantErr"]:
        with pytest.raises(ProofError):
            verify_consistency(**arguments)
    else:
        verify_consistency(**arguments)


def test_generated_proofs_verify_for_every_size():
    leaves = [leaf_hash(bytes([i])) for i in range(33)]
    for n in range(1, len(leaves) + 1):
        root = root_from_leaf_hashes(leaves[:n])
        for i in range(n):
            verify_inclusion(leaf=leaves[i], index=i, tree_size=n, proof=inclusion_proof(leaves[:n], i), root=root)
        for m in range(1, n + 1):
            verify_consistency(old_size=m, new_size=n, old_root=root_from_leaf_hashes(leaves[:m]),
                               new_root=root, proof=consistency_proof(leaves[:n], m))


# --- the log --------------------------------------------------------------------------------


def _make_log(folder: Path, rounds: int = 4) -> ProvenanceLog:
    log = ProvenanceLog.open(folder, signing_key=KEY, log_id="run-1")
    log.append("run-start", {"config_sha256": "ab" * 32, "code_sha256": "cd" * 32})
    for r in range(1, rounds + 1):
        log.append("round", {"round": r, "metrics": {"auroc": 0.5 + r / 100}, "updates": {"7": "ef" * 32}})
    return log


@pytest.fixture
def good_log(tmp_path) -> Path:
    _make_log(tmp_path / "p")
    return tmp_path / "p"


def _kept_by_hospital(folder: Path) -> dict:
    return {"hospital-A": read_checkpoints(folder / CHECKPOINT_FILE)[-1:]}


def test_intact_log_verifies(good_log):
    report = verify_log(good_log, public_key=KEY.public_key(), hospital_checkpoints=_kept_by_hospital(good_log))
    assert report.ok, report.problems
    assert (report.records, report.checkpoints, report.warnings) == (5, 5, [])


def test_reopen_continues_the_chain(good_log):
    log = ProvenanceLog.open(good_log, signing_key=KEY, log_id="run-1")
    assert log.size == 5
    log.append("round", {"round": 5})
    assert verify_log(good_log).ok


def test_open_refuses_a_different_signer(good_log):
    with pytest.raises(ValueError, match="another key"):
        ProvenanceLog.open(good_log, signing_key=Ed25519PrivateKey.generate(), log_id="run-1")


def test_crash_mid_append_drops_only_the_torn_line(good_log):
    with open(good_log / LOG_FILE, "ab") as handle:
        handle.write(b'{"seq":5,"prev":"12')  # the process died here
    report = verify_log(good_log)
    assert report.ok and any("torn last line" in w for w in report.warnings)
    log = ProvenanceLog.open(good_log, signing_key=KEY, log_id="run-1")
    assert log.size == 5 and any("dropped a torn last line" in m for m in log.recovery_messages)
    log.append("round", {"round": 5})
    assert verify_log(good_log).ok


def test_crash_between_record_and_checkpoint_is_reported_and_recovers(good_log):
    lines = (good_log / CHECKPOINT_FILE).read_bytes().splitlines(keepends=True)
    (good_log / CHECKPOINT_FILE).write_bytes(b"".join(lines[:-1]))
    report = verify_log(good_log)
    assert report.ok and any("after the last checkpoint" in w for w in report.warnings)


def _rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


TAMPERINGS = {
    "truncate log": lambda lines: lines[:-1],
    "truncate to nothing": lambda lines: [],
    "reorder": lambda lines: [lines[0], lines[2], lines[1], *lines[3:]],
    "drop a record": lambda lines: lines[:2] + lines[3:],
    "replay a record": lambda lines: lines + [lines[2]],
    "replay the last record": lambda lines: lines + [lines[-1]],
}


@pytest.mark.parametrize("case", list(TAMPERINGS))
def test_structural_tampering_is_detected(good_log, case):
    lines = (good_log / LOG_FILE).read_bytes().splitlines()
    _rewrite(good_log / LOG_FILE, TAMPERINGS[case](lines))
    assert not verify_log(good_log, public_key=KEY.public_key()).ok


@pytest.mark.parametrize("name", [LOG_FILE, CHECKPOINT_FILE])
def test_every_single_byte_edit_is_detected(tmp_path, name):
    """Flip each byte of a small log in turn: not one edit may pass verification."""
    original = tmp_path / "original"
    _make_log(original, rounds=2)
    data = (original / name).read_bytes()
    work = tmp_path / "work"
    missed = []
    for position in range(len(data)):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(original, work)
        edited = bytearray(data)
        edited[position] ^= 0x01
        (work / name).write_bytes(bytes(edited))
        report = verify_log(work, public_key=KEY.public_key())
        # Flipping the very last newline looks exactly like a crash mid-append: it is
        # reported (a torn-line warning) rather than failed; everything else must fail.
        if report.ok and not report.warnings:
            missed.append(position)
        if report.ok and position != len(data) - 1:
            missed.append(position)
    assert missed == [], f"{len(missed)} of {len(data)} byte edits went unnoticed"


def test_wrong_key_is_detected(good_log):
    report = verify_log(good_log, public_key=Ed25519PrivateKey.generate().public_key())
    assert not report.ok and any("bad signature" in p for p in report.problems)


def test_rewrite_by_the_key_holder_is_caught_by_a_hospital_checkpoint(tmp_path):
    """The server re-writes history and re-signs everything: only a kept checkpoint can tell."""
    folder = tmp_path / "p"
    _make_log(folder)
    kept = _kept_by_hospital(folder)
    shutil.rmtree(folder)
    log = ProvenanceLog.open(folder, signing_key=KEY, log_id="run-1")
    log.append("run-start", {"config_sha256": "ab" * 32, "code_sha256": "cd" * 32})
    for r in range(1, 5):
        log.append("round", {"round": r, "metrics": {"auroc": 0.99}, "updates": {"7": "ef" * 32}})
    assert verify_log(folder, public_key=KEY.public_key()).ok  # self-consistent forgery
    report = verify_log(folder, public_key=KEY.public_key(), hospital_checkpoints=kept)
    assert not report.ok and any("hospital-A" in p for p in report.problems)


def test_truncating_both_files_is_caught_by_a_hospital_checkpoint(good_log):
    kept = _kept_by_hospital(good_log)
    for name in (LOG_FILE, CHECKPOINT_FILE):
        lines = (good_log / name).read_bytes().splitlines()
        _rewrite(good_log / name, lines[:-1])
    assert verify_log(good_log).ok
    assert not verify_log(good_log, hospital_checkpoints=kept).ok


def test_inclusion_proof_checks_against_the_hospital_checkpoint(good_log):
    hospital_checkpoint = read_checkpoints(good_log / CHECKPOINT_FILE)[-1]
    proof = prove_round(good_log, server_round=3)
    check_proof(proof, hospital_checkpoint, KEY.public_key())
    assert json.loads(proof["record"])["body"]["round"] == 3
    forged = dict(proof, record=proof["record"].replace("0.53", "0.99"))
    with pytest.raises(ProofError):
        check_proof(forged, hospital_checkpoint, KEY.public_key())
    with pytest.raises(ProofError, match="signature"):
        check_proof(proof, hospital_checkpoint, Ed25519PrivateKey.generate().public_key())
    older = read_checkpoints(good_log / CHECKPOINT_FILE)[3]
    with pytest.raises(ProofError, match="--tree-size 4"):
        check_proof(proof, older, KEY.public_key())
    check_proof(prove_round(good_log, server_round=3, tree_size=4), older, KEY.public_key())
    with pytest.raises(ValueError, match="no record of round 9"):
        prove_round(good_log, server_round=9)


def test_signing_key_is_private(tmp_path):
    path = tmp_path / "keys" / "server.pem"
    key = load_or_create_key(path)
    assert path.stat().st_mode & 0o077 == 0
    assert load_or_create_key(path).public_key().public_bytes_raw() == key.public_key().public_bytes_raw()


def test_runs_starting_together_share_one_signing_key(tmp_path):
    """Two runs in one folder racing to create the key both end with the winner's key."""
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "keys" / "server.pem"
    with ThreadPoolExecutor(max_workers=8) as pool:
        keys = list(pool.map(lambda _: load_or_create_key(path), range(16)))
    on_disk = load_or_create_key(path).public_key().public_bytes_raw()
    assert {k.public_key().public_bytes_raw() for k in keys} == {on_disk}
    assert [p.name for p in path.parent.iterdir()] == ["server.pem"]  # no temporary files left


def test_compact_range_matches_the_recursive_definition():
    from common.provenance.merkle import CompactRange, prefix_roots

    leaves = [leaf_hash(str(i).encode()) for i in range(70)]
    compact = CompactRange()
    assert compact.root() == root_from_leaf_hashes([])
    for n, root in enumerate(prefix_roots(leaves), start=1):
        assert root == root_from_leaf_hashes(leaves[:n])
        compact.append(leaves[n - 1])
        assert compact.root() == root
