"""Benchmark: provenance log append (+fsync, +signed checkpoint) per round, and verification.

    python benchmarks/provenance_benchmark.py [--rounds 10000] [--folder DIR]

Each round appends a record shaped like a real one (5 hospitals' update hashes, verdicts
and metrics), with its fsync'd Ed25519-signed checkpoint. Then the whole log is verified
(chain, canonical form, every checkpoint's signature and Merkle root) and one inclusion
proof is produced and checked. The folder should be on the disk a server would use.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.provenance.log import CHECKPOINT_FILE, LOG_FILE, ProvenanceLog
from common.provenance.verify import check_proof, prove_round, read_checkpoints, verify_log

SITES = [f"hospital-{c}" for c in "ABCDX"]


def round_body(server_round: int) -> dict:
    digest = lambda s: hashlib.sha256(f"{s}/{server_round}".encode()).hexdigest()  # noqa: E731
    return {
        "round": server_round,
        "participants": SITES[:4],
        "update_sha256": {s: digest(s) for s in SITES[:4]},
        "aggregate_sha256": digest("aggregate"),
        "verdicts": {s: "accepted" for s in SITES[:4]},
        "metrics": {s: {"val-auroc": 0.8 + server_round % 7 / 100, "test-auroc": 0.79, "train-risk": 0.5} for s in SITES},
        "dp": {s: None for s in SITES[:4]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10_000)
    parser.add_argument("--folder", type=Path, default=None, help="where to write (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        folder = Path(tmp)
        key = Ed25519PrivateKey.generate()
        log = ProvenanceLog.open(folder, signing_key=key, log_id="bench")
        timings = []
        started = time.perf_counter()
        for server_round in range(1, args.rounds + 1):
            t0 = time.perf_counter()
            log.append("round", round_body(server_round))
            timings.append(time.perf_counter() - t0)
        total_append = time.perf_counter() - started
        t0 = time.perf_counter()
        report = verify_log(folder, public_key=key.public_key())
        verify_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        proof = prove_round(folder, server_round=args.rounds // 2)
        check_proof(proof, read_checkpoints(folder / CHECKPOINT_FILE)[-1], key.public_key())
        proof_seconds = time.perf_counter() - t0
        size_mb = ((folder / LOG_FILE).stat().st_size + (folder / CHECKPOINT_FILE).stat().st_size) / 1e6
    timings.sort()
    print(f"{'measure':<44}{'value':>14}")
    print("-" * 58)
    print(f"{'rounds appended':<44}{args.rounds:>14}")
    print(f"{'append+fsync+sign per round, median (ms)':<44}{statistics.median(timings) * 1e3:>14.2f}")
    print(f"{'append+fsync+sign per round, p99 (ms)':<44}{timings[int(0.99 * len(timings))] * 1e3:>14.2f}")
    print(f"{'append total (s)':<44}{total_append:>14.2f}")
    print(f"{'log + checkpoints size (MB)':<44}{size_mb:>14.2f}")
    print(f"{'verify whole log (s)':<44}{verify_seconds:>14.2f}")
    print(f"{'verified ok':<44}{str(report.ok):>14}")
    print(f"{'prove + check one round (s)':<44}{proof_seconds:>14.2f}")


if __name__ == "__main__":
    main()
