"""A self-contained HTML report of one run: per-hospital metrics, i.i.d. vs o.o.d., plots."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from common.config import Scenario  # noqa: E402
from simulations.datasets import build_site  # noqa: E402
from simulations.selection import select_round, summarise_run  # noqa: E402

SAMPLES_PER_SITE = 8


def _figure_to_png(figure, path: Path) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    path.write_bytes(buffer.getvalue())
    return base64.b64encode(buffer.getvalue()).decode()


def _series(history: dict[str, Any], site: str, key: str) -> tuple[list[int], list[float]]:
    rounds, values = [], []
    for entry in history["rounds"]:
        value = entry["sites"].get(site, {}).get(key)
        if value is not None:
            rounds.append(entry["round"])
            values.append(value)
    return rounds, values


def plot_metric(history: dict[str, Any], key: str, title: str, path: Path, *, selected: int | None) -> str:
    figure, axis = plt.subplots(figsize=(7, 3.6))
    for site, info in history["meta"].get("sites", {}).items():
        rounds, values = _series(history, site, key)
        style = "--" if info["role"] == "heldout" else "-"
        axis.plot(rounds, values, style, marker="o", markersize=3, label=f"{site} ({info['role']})")
    if selected is not None:
        axis.axvline(selected, color="grey", linestyle=":", label=f"selected round {selected}")
    axis.set_xlabel("round")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best")
    return _figure_to_png(figure, path)


def plot_samples(scenario: Scenario, path: Path) -> str:
    sites = scenario.data.sites
    figure, axes = plt.subplots(len(sites), SAMPLES_PER_SITE, figsize=(SAMPLES_PER_SITE * 1.1, len(sites) * 1.25))
    for row, site in enumerate(sites):
        data = build_site(scenario, row).test
        for col in range(SAMPLES_PER_SITE):
            axis = axes[row, col]
            axis.axis("off")
            if col < len(data):
                axis.imshow(data.images[col, 0], cmap="gray", vmin=0, vmax=1)
                axis.set_title(f"y={data.labels[col]}", fontsize=7)
        axes[row, 0].text(-4, 14, site.name, fontsize=8, ha="right", va="center")
    return _figure_to_png(figure, path)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _site_rows(history: dict[str, Any], scenario: Scenario, selected: int) -> list[list[Any]]:
    by_round = {r["round"]: r["sites"] for r in history["rounds"]}
    final = history["rounds"][-1]["round"]
    rows = []
    for site in scenario.data.sites:
        at_final, at_selected = by_round[final].get(site.name, {}), by_round[selected].get(site.name, {})
        rows.append([
            site.name, site.role, site.correlation, site.prevalence,
            at_selected.get("val-auroc") if site.role == "train" else None,
            at_selected.get("test-auroc"), at_final.get("test-auroc"), at_final.get("test-accuracy"),
        ])
    return rows


def _provenance_section(run_dir: Path) -> str:
    """Log status: what `causalfed log verify RUN` would say, hospitals' checkpoints included."""
    from common.provenance.log import HOSPITALS_DIR, PROVENANCE_DIR
    from common.provenance.verify import read_kept_checkpoints, verify_log

    folder = run_dir / PROVENANCE_DIR
    if not folder.is_dir():
        return "<h2>Provenance log</h2><p>No provenance log in this run.</p>"
    kept = read_kept_checkpoints(run_dir / HOSPITALS_DIR)
    report = verify_log(folder, hospital_checkpoints=kept)
    status = "verified" if report.ok else "FAILED: " + "; ".join(report.problems[:5])
    rows = [[name, len(cps), cps[-1].tree_size if cps else None] for name, cps in kept.items()]
    return (
        f"<h2>Provenance log</h2><p>{report.records} hash-chained records, {report.checkpoints} "
        f"Ed25519-signed checkpoints: <b>{html.escape(status)}</b>. "
        f"Check it yourself: <code>causalfed log verify {html.escape(str(run_dir))}</code>.</p>"
        + _table(["hospital", "checkpoints kept", "latest tree size"], rows)
    )


def write_report(run_dir: Path, history: dict[str, Any], scenario: Scenario) -> Path:
    warmup = int(history["meta"].get("warmup-rounds", 0))
    selected = select_round(history, warmup_rounds=warmup)
    auroc_png = plot_metric(history, "test-auroc", "test AUROC per hospital", run_dir / "auroc.png", selected=selected)
    loss_png = plot_metric(history, "train-risk", "local training risk", run_dir / "train_risk.png", selected=None)
    samples_png = plot_samples(scenario, run_dir / "samples.png")
    meta = history["meta"]
    provenance_html = _provenance_section(run_dir)
    summary_rows = [
        [f"{label} (round {row['round']})", row["iid-auroc"], row["ood-auroc"], row["worst-train-site-auroc"]]
        for label, row in summarise_run(history, warmup_rounds=warmup).items()
    ]
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>causalfed run: {html.escape(scenario.name)}</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
th{{background:#f3f3f3}}img{{max-width:100%}}code{{background:#f3f3f3;padding:1px 4px}}</style></head><body>
<h1>causalfed run: {html.escape(scenario.name)}</h1>
<p>objective <code>{html.escape(scenario.training.objective)}</code>, {len(history['rounds'])} rounds,
engine <code>{html.escape(str(meta.get('engine')))}</code>, {_fmt(meta.get('seconds'))} s.
Config SHA-256 <code>{html.escape(str(meta.get('config-sha256')))}</code>.</p>
<h2>i.i.d. vs o.o.d.</h2>
<p>i.i.d.: mean test AUROC of the training hospitals on their own held-back patients.
o.o.d.: test AUROC at the held-out hospital(s), which never trained. Rounds are selected
on the training hospitals' validation data only, after the objective's warm-up ({warmup}
rounds), by the objective's own value (the default, marked in the plots) or by AUROC;
the held-out hospital plays no part in either choice.</p>
{_table(["model", "i.i.d. AUROC", "o.o.d. AUROC", "worst training site"], summary_rows)}
<h2>Per hospital</h2>
{_table(["hospital", "role", "shortcut correlation", "prevalence", "val AUROC (selected)",
         "test AUROC (selected)", "test AUROC (final)", "test accuracy (final)"],
        _site_rows(history, scenario, selected))}
<img src="data:image/png;base64,{auroc_png}" alt="AUROC per round">
<img src="data:image/png;base64,{loss_png}" alt="training risk per round">
{provenance_html}
<h2>What each hospital's images look like</h2>
<img src="data:image/png;base64,{samples_png}" alt="sample images">
<p>Files: <code>metrics.json</code> (every round, every hospital), <code>scenario.json</code>,
<code>model.pt</code> (final global model), <code>flower.log</code>.</p>
</body></html>"""
    path = run_dir / "report.html"
    path.write_text(page)
    return path
