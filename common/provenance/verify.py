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


@dataclass(frozen=True)
class Problem:
    """One thing that does not verify: ``kind`` says what, ``record`` (a 0-based sequence
    number) or ``checkpoint`` (its tree size) where."""

    kind: str  # unreadable | modified | sequence | chain | signature | key | root | size | missing-file | no-checkpoint | order
    text: str
    record: int | None = None
    checkpoint: int | None = None
    holder: str | None = None  # the hospital whose kept checkpoint it is, if any
    found: int | None = None  # a sequence problem: the record number the line holds


@dataclass
class Verification:
    records: int = 0
    checkpoints: int = 0
    details: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [problem.text for problem in self.details]

    @property
    def ok(self) -> bool:
        return not self.details

    def add(self, kind: str, text: str, **where) -> None:
        self.details.append(Problem(kind, text, **where))

    def summary(self) -> list[str]:
        """One line per finding, as a person reads it: which records were modified, which
        are missing or out of place, which checkpoints no longer match, and why."""
        return summarise(self)


def _ranges(numbers: list[int]) -> list[str]:
    spans, numbers = [], sorted(set(numbers))
    for number in numbers:
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return [f"{a}" if a == b else f"{a}-{b}" for a, b in spans]


def summarise(report: Verification) -> list[str]:
    lines: list[str] = []
    by_kind: dict[str, list[Problem]] = {}
    for problem in report.details:
        by_kind.setdefault(problem.kind, []).append(problem)
    for problem in by_kind.get("missing-file", []) + by_kind.get("key", []) + by_kind.get("order", []):
        lines.append(problem.text)
    modified = [p.record for p in by_kind.get("modified", []) + by_kind.get("unreadable", [])]
    # A record whose successor no longer chains to it was changed in place, unless the
    # sequence numbers say records were dropped or moved around it.
    moved = {p.record for p in by_kind.get("sequence", [])}
    modified += [p.record - 1 for p in by_kind.get("chain", []) if p.record not in moved and p.record - 1 not in moved]
    for span in _ranges([r for r in modified if r is not None]):
        lines.append(f"record{'s' if '-' in span else ''} {span} modified")
    lines += _sequence_findings(report, by_kind.get("sequence", []), by_kind.get("size", []))
    for problem in by_kind.get("signature", []):
        lines.append(problem.text)
    roots = [p for p in by_kind.get("root", []) if p.holder is None]
    if roots:
        why = "the records above were changed" if modified or moved else "the records were rewritten"
        lines.append(f"checkpoints of tree size {', '.join(_ranges([p.checkpoint for p in roots]))} no longer match "
                     f"the log: {why} after they were signed")
    holders = sorted({p.holder for p in report.details if p.holder is not None})
    for holder in holders:
        sizes = [p.checkpoint for p in report.details if p.holder == holder]
        lines.append(f"{holder}'s kept checkpoints of tree size {', '.join(_ranges(sizes))} do not match the log: "
                     "it was changed after they were signed")
    if by_kind.get("no-checkpoint"):
        lines.append(by_kind["no-checkpoint"][0].text)
    return lines


def _sequence_findings(report: Verification, sequence: list[Problem], sizes: list[Problem]) -> list[str]:
    """Missing, repeated and reordered records, from the record numbers the lines hold."""
    held = list(range(report.records))
    for problem in sequence:
        if problem.found is not None:
            held[problem.record] = problem.found
    committed = max([p.checkpoint for p in sizes if p.holder is None], default=0)
    total = max([committed, *(n + 1 for n in held)])
    lines = []
    missing = sorted(set(range(total)) - set(held))
    if missing:
        spans = _ranges(missing)
        lines.append(f"record{'s' if len(missing) > 1 else ''} {', '.join(spans)} missing")
    repeated = sorted({n for n in held if held.count(n) > 1})
    if repeated:
        lines.append(f"record{'s' if len(repeated) > 1 else ''} {', '.join(map(str, repeated))} repeated")
    unique = [n for i, n in enumerate(held) if n not in held[:i]]
    if unique != sorted(unique):
        out_of_place = [a for a, b in zip(unique, sorted(unique)) if a != b]
        lines.append(f"records {', '.join(_ranges(out_of_place))} out of order")
    return lines


def _read_lines(path: Path, report: Verification) -> list[bytes]:
    if not path.exists():
        report.add("missing-file", f"{path.name} is missing")
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
            report.add("unreadable", f"{where}: not valid JSON ({error})", record=seq)
            record, canonical = None, False
        if record is not None and not canonical:
            report.add("modified", f"{where}: not in canonical form (edited)", record=seq)
        if isinstance(record, dict):
            found = record.get("seq")
            if found != seq:
                what = (f"records {seq}-{found - 1} missing before it" if isinstance(found, int) and found > seq
                        else f"it repeats or moves record {found}")
                report.add("sequence", f"{where}: holds record {found} where record {seq} belongs ({what})",
                           record=seq, found=found if isinstance(found, int) else None)
            if record.get("prev") != previous:
                report.add("chain", f"{where}: hash chain broken (the record before it was changed, dropped or "
                           "reordered)", record=seq)
        previous = sha256_hex(line)
    report.records = len(lines)
    return [leaf_hash(line) for line in lines]


def _check_checkpoint(
    cp: Checkpoint, roots: list[bytes], key: Ed25519PublicKey, where: str, report: Verification,
    holder: str | None = None,
) -> None:
    """``roots[k]`` is the Merkle root of the first k records."""
    at = {"checkpoint": cp.tree_size, "holder": holder}
    if not cp.verify(key):
        report.add("signature", f"{where}: bad signature (wrong key, or the checkpoint was edited)", **at)
    if cp.key_id != key_id(key):
        report.add("key", f"{where}: signed by key {cp.key_id}, verifying with {key_id(key)}", **at)
    if cp.tree_size >= len(roots):
        report.add("size", f"{where}: commits to {cp.tree_size} records but the log holds "
                   f"{len(roots) - 1} (records were removed)", **at)
    elif roots[cp.tree_size].hex() != cp.root:
        report.add("root", f"{where}: Merkle root over the first {cp.tree_size} records differs "
                   "(records were changed or rewritten)", **at)


def _parse_checkpoints(lines: list[bytes], report: Verification) -> list[Checkpoint]:
    checkpoints = []
    for number, line in enumerate(lines, start=1):
        try:
            checkpoints.append(Checkpoint.from_json(line.decode()))
        except (ValueError, UnicodeDecodeError) as error:
            report.add("signature", f"{CHECKPOINT_FILE} line {number}: unreadable ({error})")
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
            report.add("missing-file", f"{PUBLIC_KEY_FILE} is missing and no key was given")
            return report
        public_key = load_public_key(key_path.read_bytes())
    leaves = _check_records(_read_lines(folder / LOG_FILE, report), report)
    checkpoints = _parse_checkpoints(_read_lines(folder / CHECKPOINT_FILE, report), report)
    report.checkpoints = len(checkpoints)
    sizes = [cp.tree_size for cp in checkpoints]
    if sizes != sorted(set(sizes)):
        report.add("order", f"{CHECKPOINT_FILE}: tree sizes do not grow one append at a time ({sizes[:8]}...)")
    roots = [EMPTY_ROOT, *prefix_roots(leaves)]
    for number, cp in enumerate(checkpoints, start=1):
        _check_checkpoint(cp, roots, public_key, f"{CHECKPOINT_FILE} line {number}", report)
    if not checkpoints and leaves:
        report.add("no-checkpoint", "the log has records but no signed checkpoint")
    elif checkpoints and checkpoints[-1].tree_size < len(leaves):
        report.warnings.append(f"{len(leaves) - checkpoints[-1].tree_size} record(s) after the last "
                               "checkpoint (a crash between append and checkpoint)")
    for hospital, kept in (hospital_checkpoints or {}).items():
        for cp in kept:
            _check_checkpoint(cp, roots, public_key, f"checkpoint kept by {hospital} (size {cp.tree_size})", report,
                              holder=hospital)
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
