"""Study: how far one round's validation-direction evidence separates flippers from honest
hospitals, round by round (issue 4's remaining TPR gap).

The guard's ``validation-direction`` detector scores an update by its cosine with the
descent direction of a ranking loss on the server's validation cases, over the cosine's
bootstrap error with an honest round-to-round wobble in quadrature
(``ValidationDirectionDetector``); ``reference-direction`` by its cosine with the server's
balanced reference training, over the references' jackknife error with the same wobble
(``--detector``). This script runs the guard scenario under sign-flip and
label-flip attacks (and none), records every client's cosine and error each round, and
asks what the wobble costs and what it buys:

- attackers: the share whose one-round z reaches the z a client needs to be flagged alone
  in its first round (Benjamini-Hochberg's smallest threshold, after the guard's Bonferroni
  over detector families), with the bootstrap error alone and with the guard's wobble;
- honest hospitals: the share of their rounds over that z, alone and with the wobble, and
  their largest one-round z on the bootstrap error alone, and where.

A round whose cosine is under the detector's ``min_cosine`` has no direction and no z.
With ``--attacks`` and no attack named, only the attack-free run (e.g. many seeds' first
rounds: ``--rounds 1``, 6 s a seed).

    python benchmarks/ranking_evidence.py [--seeds 1 11] [--rounds 6] [--attacks sign-flip label-flip]
    python benchmarks/ranking_evidence.py --seeds $(seq 0 60) --rounds 1 --attacks
    python benchmarks/ranking_evidence.py --detector reference-direction --seeds 4 --rounds 3
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import norm

from common.config import Scenario, load_scenario
from server.detectors import DETECTORS, combine_by_family
from server.harm_detectors import ValidationDirectionDetector
from server.guard import CausalGuard
from simulations.runner import run_scenario

COUNTS = (1, 2, 3)


@dataclass(frozen=True)
class Reading:
    """One client's cosine and error (validation or reference direction) in one round of one run."""

    run: str
    round: int
    client: str
    malicious: bool
    cosine: float
    error: float

    def z(self, *, wobble: float) -> float:
        """The detector's one-round score, unclipped (``ValidationDirectionDetector.round_z``)."""
        return float(ValidationDirectionDetector.round_z(np.array([self.cosine]), np.array([self.error]),
                                                         wobble=wobble)[0])


def first_round_flag_z(detectors: tuple[str, ...], *, fdr: float, clients: int,
                       detector: str = ValidationDirectionDetector.name) -> float:
    """The z of ``detector`` that a lone client needs to be flagged in a round with no
    history: Benjamini-Hochberg's smallest threshold (``fdr`` over ``clients``), after the
    guard's Bonferroni within and across detector families (``combine_by_family``)."""
    tiny = 1e-12
    factor = combine_by_family({d: np.array([tiny if d == detector else 1.0]) for d in detectors})[0] / tiny
    return float(norm.isf(fdr / clients / factor))


def record_readings(scenario: Scenario, run: str, attackers: list[str],
                    detector: str = ValidationDirectionDetector.name) -> list[Reading]:
    """Run ``scenario`` and keep what the guard measured of every update for ``detector``
    (its ``measurements``), every round."""
    readings: list[Reading] = []
    judge = CausalGuard.judge
    measure = DETECTORS[detector]().measurements

    def recording_judge(guard: CausalGuard, clients: list[str], sketches: np.ndarray, measured=None):
        # Wrapped, not subclassed: the runner builds its own guard from the scenario.
        round_ = 1 + len({r.round for r in readings if r.run == run})
        cosines, errors = measure(measured) if measured is not None else (None, None)
        if cosines is not None:
            readings.extend(Reading(run, round_, c, c in attackers, float(cos), float(err))
                            for c, cos, err in zip(clients, cosines, errors))
        return judge(guard, clients, sketches, measured)

    CausalGuard.judge = recording_judge
    try:
        with tempfile.TemporaryDirectory() as folder:
            run_scenario(scenario, run_dir=Path(folder))
    finally:
        CausalGuard.judge = judge
    return readings


def _share_over(readings: list[Reading], *, flag_z: float, wobble: float) -> float:
    """The share of ``readings`` whose z reaches ``flag_z`` (NaN for none; no direction: not over)."""
    return float(np.mean([r.z(wobble=wobble) >= flag_z for r in readings])) if readings else float("nan")


def per_round_table(readings: list[Reading], *, flag_z: float, wobble: float) -> list[str]:
    """One line per round: the shares of attackers and of honest hospitals' rounds over
    ``flag_z``, on the bootstrap error alone and with ``wobble`` in quadrature, and the
    honest hospitals' largest z on the bootstrap error alone."""
    by_round: dict[int, list[Reading]] = defaultdict(list)
    for reading in readings:
        by_round[reading.round].append(reading)
    lines = [f"{'round':>5}{'attackers':>10}{'over, bootstrap error':>23}{'wobble':>8}{'honest':>8}"
             f"{'over, bootstrap error':>23}{'wobble':>8}{'max z':>7}{'wobble':>8}  where (cosine +/- error)"]
    for round_, rows in sorted(by_round.items()):
        bad = [r for r in rows if r.malicious]
        honest = [r for r in rows if not r.malicious]
        directed = [r for r in honest if np.isfinite(r.z(wobble=0.0))]
        shares = [_share_over(group, flag_z=flag_z, wobble=w) for group in (bad, honest) for w in (0.0, wobble)]
        worst = max(directed, key=lambda r: r.z(wobble=0.0), default=None)
        worst_wobbled = max((r.z(wobble=wobble) for r in directed), default=float("nan"))
        where = f"{worst.run} {worst.client} ({worst.cosine:+.2f} +/- {worst.error:.2f})" if worst else ""
        lines.append(f"{round_:>5}{len(bad):>10}{shares[0]:>23.2f}{shares[1]:>8.2f}{len(honest):>8}"
                     f"{shares[2]:>23.3f}{shares[3]:>8.3f}"
                     f"{worst.z(wobble=0.0) if worst else float('nan'):>7.1f}{worst_wobbled:>8.1f}  {where}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 11])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--attacks", nargs="*", default=["sign-flip", "label-flip"])
    parser.add_argument("--detector", choices=["validation-direction", "reference-direction"],
                        default="validation-direction", help="whose cosines and errors to study")
    args = parser.parse_args()
    readings: list[Reading] = []
    for seed in args.seeds:
        base = load_scenario("guard").with_overrides(federation={"num_rounds": args.rounds}, seed=seed)
        names = [s.name for s in base.data.sites if s.role == "train"]
        runs = [(None, [])] + [(attack, names[1 : 1 + count]) for attack in args.attacks for count in COUNTS]
        for attack, attackers in runs:
            scenario = base if attack is None else base.with_overrides(attack={"name": attack, "malicious": attackers})
            run = f"s{seed}/{attack or 'none'}x{len(attackers)}"
            readings += record_readings(scenario, run, attackers, args.detector)
            print(f"  recorded {run}", flush=True)
    guard = load_scenario("guard").federation.guard
    flag_z = first_round_flag_z(CausalGuard().detectors, fdr=guard.fdr, clients=len(names), detector=args.detector)
    print(f"\n{args.detector}, seeds {args.seeds}; a lone client is flagged in its first round at z >= {flag_z:.2f}")
    print("\n".join(per_round_table(readings, flag_z=flag_z, wobble=ValidationDirectionDetector.direction_wobble)))


if __name__ == "__main__":
    main()
