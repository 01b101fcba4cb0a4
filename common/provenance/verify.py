"""Checking a provenance log, and inclusion proofs a hospital can check on its own."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.provenance.log import CHECKPOINT_FILE, LOG_FILE, PUBLIC_KEY_FILE
from common.provenance.merkle import (
    EMPTY_ROOT,
    ProofError,
    inclusion_proof,
    leaf_hash,
    prefix_roots,
    verify_inclusion,
)
from common.provenance.records import GENESIS, Checkpoint, canonical_bytes, key_id, load_public_key, sha256_hex


@dataclass
class Verification:
    records: int = 0
    checkpoints: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _read_lines(path: Path, report: Verification) -> list[bytes]:
    if not path.exists():
        report.problems.append(f"{path.name} is missing")
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        report.warnings.append(
            f"{path.name}: torn last line (a crash interrupted an append); it is ignored here and "
            "dropped when the log is next opened"
        )
        data = data[: data.rfind(b"\n") + 1]
    return data.splitlines()


def _check_records(lines: list[bytes], report: Verification) -> list[bytes]:
    """Chain and form of every record; returns the Merkle leaf hashes of all lines."""
    previous = GENESIS
    for seq, line in enumerate(lines):
        where = f"{LOG_FILE} line {seq + 1}"
        try:
            record = json.loads(line)
            canonical = canonical_bytes(record) == line
        except (ValueError, UnicodeDecodeError) as error:
            report.problems.append(f"{where}: not valid JSON ({error})")
            record, canonical = None, False
        if record is not None and not canonical:
            report.problems.append(f"{where}: not in canonical form (edited)")
        if isinstance(record, dict):
            if record.get("seq") != seq:
                report.problems.append(f"{where}: sequence number {record.get('seq')} where {seq} belongs "
                                       "(a record was dropped, replayed or moved)")
            if record.get("prev") != previous:
                report.problems.append(f"{where}: hash chain broken (the record before it was changed, "
                                       "dropped or reordered)")
        previous = sha256_hex(line)
    report.records = len(lines)
    return [leaf_hash(line) for line in lines]


def _check_checkpoint(cp: Checkpoint, roots: list[bytes], key: Ed25519PublicKey, where: str, report: Verification) -> None:
    """``roots[k]`` is the Merkle root of the first k records."""
    if not cp.verify(key):
        report.problems.append(f"{where}: bad signature (wrong key, or the checkpoint was edited)")
    if cp.key_id != key_id(key):
        report.problems.append(f"{where}: signed by key {cp.key_id}, verifying with {key_id(key)}")
    if cp.tree_size >= len(roots):
        report.problems.append(f"{where}: commits to {cp.tree_size} records but the log holds "
                               f"{len(roots) - 1} (records were removed)")
    elif roots[cp.tree_size].hex() != cp.root:
        report.problems.append(f"{where}: Merkle root over the first {cp.tree_size} records differs "
                               "(records were changed or rewritten)")


def _parse_checkpoints(lines: list[bytes], report: Verification) -> list[Checkpoint]:
    checkpoints = []
    for number, line in enumerate(lines, start=1):
        try:
            checkpoints.append(Checkpoint.from_json(line.decode()))
        except (ValueError, UnicodeDecodeError) as error:
            report.problems.append(f"{CHECKPOINT_FILE} line {number}: unreadable ({error})")
    return checkpoints


def verify_log(
    folder: Path,
    *,
    public_key: Ed25519PublicKey | None = None,
    hospital_checkpoints: dict[str, list[Checkpoint]] | None = None,
) -> Verification:
    """Check chain, canonical form, every signed checkpoint, and hospitals' kept checkpoints.

    ``public_key`` pins the server key (as hospitals do); by default the log's own
    ``public_key.pem`` is used, which proves integrity but not who signed.
    """
    folder = Path(folder)
    report = Verification()
    if public_key is None:
        key_path = folder / PUBLIC_KEY_FILE
        if not key_path.exists():
            report.problems.append(f"{PUBLIC_KEY_FILE} is missing and no key was given")
            return report
        public_key = load_public_key(key_path.read_bytes())
    leaves = _check_records(_read_lines(folder / LOG_FILE, report), report)
    checkpoints = _parse_checkpoints(_read_lines(folder / CHECKPOINT_FILE, report), report)
    report.checkpoints = len(checkpoints)
    sizes = [cp.tree_size for cp in checkpoints]
    if sizes != sorted(set(sizes)):
        report.problems.append(f"{CHECKPOINT_FILE}: tree sizes do not grow one append at a time ({sizes[:8]}...)")
    roots = [EMPTY_ROOT, *prefix_roots(leaves)]
    for number, cp in enumerate(checkpoints, start=1):
        _check_checkpoint(cp, roots, public_key, f"{CHECKPOINT_FILE} line {number}", report)
    if not checkpoints and leaves:
        report.problems.append("the log has records but no signed checkpoint")
    elif checkpoints and checkpoints[-1].tree_size < len(leaves):
        report.warnings.append(f"{len(leaves) - checkpoints[-1].tree_size} record(s) after the last "
                               "checkpoint (a crash between append and checkpoint)")
    for hospital, kept in (hospital_checkpoints or {}).items():
        for cp in kept:
            _check_checkpoint(cp, roots, public_key, f"checkpoint kept by {hospital} (size {cp.tree_size})", report)
    return report


def read_checkpoints(path: Path) -> list[Checkpoint]:
    return [Checkpoint.from_json(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_kept_checkpoints(folder: Path) -> dict[str, list[Checkpoint]]:
    """The checkpoints each hospital kept, from ``folder/<hospital>/checkpoints.jsonl``."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {path.parent.name: read_checkpoints(path) for path in sorted(folder.glob(f"*/{CHECKPOINT_FILE}"))}


def prove_round(folder: Path, *, server_round: int, tree_size: int | None = None) -> dict[str, Any]:
    """An inclusion proof of round ``server_round``'s record in the tree of ``tree_size``
    records (default: the latest checkpoint), to check against a hospital's checkpoint."""
    folder = Path(folder)
    lines = (folder / LOG_FILE).read_bytes().splitlines()
    checkpoints = read_checkpoints(folder / CHECKPOINT_FILE)
    if not checkpoints:
        raise ValueError("the log has no checkpoint to prove against")
    chosen = checkpoints[-1] if tree_size is None else next((c for c in checkpoints if c.tree_size == tree_size), None)
    if chosen is None:
        raise ValueError(f"no checkpoint of tree size {tree_size}; sizes: {[c.tree_size for c in checkpoints]}")
    records = (json.loads(line) for line in lines[: chosen.tree_size])
    index = next(
        (i for i, r in enumerate(records) if r.get("kind") == "round" and r.get("body", {}).get("round") == server_round),
        None,
    )
    if index is None:
        raise ValueError(f"no record of round {server_round} within the first {chosen.tree_size} records")
    leaves = [leaf_hash(line) for line in lines[: chosen.tree_size]]
    return {
        "record": lines[index].decode(),
        "leaf_index": index,
        "tree_size": chosen.tree_size,
        "proof": [base64.b64encode(h).decode() for h in inclusion_proof(leaves, index)],
        "checkpoint": json.loads(chosen.to_json()),
    }


def check_proof(proof: dict[str, Any], checkpoint: Checkpoint, public_key: Ed25519PublicKey) -> None:
    """What a hospital runs: its own signed checkpoint vouches for the proven record.

    Raises ProofError when the record is not in the log the checkpoint commits to.
    """
    if not checkpoint.verify(public_key):
        raise ProofError("the checkpoint's signature does not verify with the pinned server key")
    if proof["tree_size"] != checkpoint.tree_size:
        raise ProofError(f"proof is for tree size {proof['tree_size']}, the checkpoint for {checkpoint.tree_size}: "
                         f"ask for `causalfed log prove RUN --round N --tree-size {checkpoint.tree_size}`")
    verify_inclusion(
        leaf=leaf_hash(proof["record"].encode()),
        index=int(proof["leaf_index"]),
        tree_size=checkpoint.tree_size,
        proof=[base64.b64decode(p) for p in proof["proof"]],
        root=bytes.fromhex(checkpoint.root),
    )
