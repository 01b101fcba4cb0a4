"""A self-contained HTML report of one run: per-hospital metrics, i.i.d. vs o.o.d., plots."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from simulations.scenario import SimulationScenario as Scenario# noqa: E402
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


def _epsilon_spent(history: dict[str, Any], site: str) -> float | None:
    spent = [r["sites"].get(site, {}).get("train-dp-epsilon") for r in history["rounds"]]
    spent = [value for value in spent if value is not None]
    return max(spent) if spent else None


def _site_rows(history: dict[str, Any], scenario: Scenario, selected: int) -> list[list[Any]]:
    by_round = {r["round"]: r["sites"] for r in history["rounds"]}
    final = history["rounds"][-1]["round"]
    rows = []
    for site in scenario.data.sites:
        at_final, at_selected = by_round[final].get(site.name, {}), by_round[selected].get(site.name, {})
        rows.append([
            site.name, site.role, site.correlation, site.prevalence,
            at_selected.get("val-auroc") if site.role == "train" else None,
            at_selected.get("test-auroc"), at_final.get("test-auroc"), at_final.get("test-cal-accuracy"),
            at_final.get("test-cal-ece"), at_final.get("prevalence-used"), _epsilon_spent(history, site.name),
        ])
    return rows


def _anomaly_reports(run_dir: Path) -> list[dict[str, Any]]:
    from server.guard.round import read_round_reports

    return read_round_reports(run_dir)


def plot_anomaly_graph(reports: list[dict[str, Any]], path: Path) -> str:
    """Left: the dependency graph (an edge: an update computed from another's, or from the
    others' statistics; red: excluded at least once). Right: per round and hospital, what
    the guard did (excluded, shortened, accepted)."""
    import networkx as nx
    import numpy as np

    clients = sorted({v["client"] for r in reports for v in r["verdicts"]})
    excluded = {c: sum(c in r["excluded"] for r in reports) for c in clients}
    graph = nx.DiGraph()
    graph.add_nodes_from(clients)
    for report in reports:
        for edge in report.get("edges", []):
            source = edge["from"].split(" (round")[0]
            weight = graph.get_edge_data(source, edge["to"], {"weight": 0})["weight"]
            graph.add_edge(source, edge["to"], weight=weight + 1)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    layout = nx.circular_layout(graph)
    colours = ["#d62728" if excluded.get(c) else "#1f77b4" for c in graph.nodes]
    widths = [1 + graph[a][b]["weight"] for a, b in graph.edges]
    nx.draw_networkx(graph, layout, ax=left, node_color=colours, node_size=320, width=widths, font_size=7,
                     arrows=True)
    left.set_title("dependency graph: edges = computed from (width: rounds); red: excluded")
    left.axis("off")
    state = np.array([[next((2.0 if v["excluded"] else (1.0 if v["clip_scale"] < 1 else 0.0)
                             for v in r["verdicts"] if v["client"] == c), np.nan) for r in reports] for c in clients])
    image = right.imshow(state, aspect="auto", cmap="Reds", vmin=0, vmax=2)
    right.set_yticks(range(len(clients)), clients, fontsize=7)
    right.set_xticks(range(len(reports)), [r["round"] for r in reports], fontsize=7)
    right.set_xlabel("round")
    right.set_title("guard: 0 accepted, 1 shortened, 2 excluded")
    figure.colorbar(image, ax=right, ticks=[0, 1, 2])
    return _figure_to_png(figure, path)


def _anomaly_section(run_dir: Path) -> str:
    reports = _anomaly_reports(run_dir)
    if not reports:
        return "<h2 id=\"anomalies\">Anomalies</h2><p>The server guard was off in this run.</p>"
    png = plot_anomaly_graph(reports, run_dir / "anomaly_graph.png")
    rows = [[r["round"], v["client"], "excluded" if v["excluded"] else f"kept at {v['clip_scale']:.2g}",
             "; ".join(v["reasons"])] for r in reports for v in r["verdicts"] if v["reasons"]]
    flagged = (_table(["round", "hospital", "verdict", "evidence"], rows) if rows
               else "<p>No detector flagged an update.</p>")
    ran = reports[-1]["detectors"]
    detectors = _table(["detector", "last round"], [[name, text] for name, text in ran.items()])
    return (
        "<h2 id=\"anomalies\">Anomalies (server guard)</h2><p>Every update was inspected before aggregation. "
        "An update is excluded only on evidence that a different prevalence, scanner, size or joining time cannot "
        "produce; evidence they can also produce only lowers its weight; every accepted update is shortened to "
        "at most a few typical updates' length. Per-round JSON: "
        "<code>anomalies/</code>.</p>"
        f"{flagged}{detectors}<img src=\"data:image/png;base64,{png}\" alt=\"anomaly graph\">"
    )


def _provenance_section(run_dir: Path) -> str:
    """Log status: what `causalfed log verify RUN` would say, hospitals' checkpoints included."""
    from common.provenance.log import HOSPITALS_DIR, PROVENANCE_DIR
    from common.provenance.verify import read_kept_checkpoints, verify_log

    folder = run_dir / PROVENANCE_DIR
    if not folder.is_dir():
        return "<h2>Provenance log</h2><p>No provenance log in this run.</p>"
    kept = read_kept_checkpoints(run_dir / HOSPITALS_DIR)
    report = verify_log(folder, hospital_checkpoints=kept)
    status = "verified" if report.ok else "FAILED: " + "; ".join(report.summary()[:5])
    rows = [[name, len(cps), cps[-1].tree_size if cps else None] for name, cps in kept.items()]
    return (
        f"<h2 id=\"provenance\">Provenance log</h2><p>{report.records} hash-chained records, {report.checkpoints} "
        f"Ed25519-signed checkpoints: <b>{html.escape(status)}</b>. "
        f"Check it yourself: <code>causalfed log verify {html.escape(str(run_dir))}</code>.</p>"
        + _table(["hospital", "checkpoints kept", "latest tree size"], rows)
    )


def _onboarding_section(run_dir: Path) -> str:
    """What `causalfed adapt` will compare a new hospital against."""
    from common.feature_shift import FEATURE_MOMENTS_FILE, SMALL_EFFECT

    path = run_dir / FEATURE_MOMENTS_FILE
    if not path.is_file():
        return ("<h2>Onboarding a new hospital</h2><p>No feature moments in this run (none are released "
                "under DP-SGD): <code>causalfed adapt</code> will adapt without checking the shift.</p>")
    saved = json.loads(path.read_text())
    rows = [[site, shift] for site, shift in saved.get("sites", {}).items()]
    return (
        f"<h2>Onboarding a new hospital</h2><p><code>{FEATURE_MOMENTS_FILE}</code> holds the final model's "
        f"feature moments over {saved['count']} training images. <code>causalfed adapt "
        f"{html.escape(str(run_dir))}/model.pt NEW.npz -o ADAPTED.pt</code> adapts the model to a new hospital's "
        f"unlabeled images only if their features moved at least {SMALL_EFFECT} (mean standardised difference) "
        "from these; the federation's own hospitals sit this far from their pool:</p>"
        + _table(["hospital", "shift from the pool"], rows)
    )


def _verdict_section(history: dict[str, Any], scenario: Scenario, baseline: dict[str, Any] | None) -> str:
    from simulations.verdict import method_result, reverses_a_shortcut, verdict_lines

    results = [method_result(scenario.training.objective, history)]
    if baseline is not None:
        results.append(method_result("FedAvg-ERM", baseline))
    lines = verdict_lines(results, reversed_shortcut=reverses_a_shortcut(scenario))
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return (f"<h2 id=\"verdict\">Verdict</h2><ul class=\"verdict\">{items}</ul>"
            "<p>Held-out: hospitals that never trained, where the shortcuts may be reversed; i.i.d.: the training "
            "hospitals' own held-back patients. Final models.</p>")


def write_report(run_dir: Path, history: dict[str, Any], scenario: Scenario, baseline: dict[str, Any] | None = None) -> Path:
    warmup = int(history["meta"].get("warmup-rounds", 0))
    selected = select_round(history, warmup_rounds=warmup)
    auroc_png = plot_metric(history, "test-auroc", "test AUROC per hospital", run_dir / "auroc.png", selected=selected)
    loss_png = plot_metric(history, "train-risk", "local training risk", run_dir / "train_risk.png", selected=None)
    images = scenario.data.source != "heart_disease"  # tabular hospitals have no pictures
    samples_html = ""
    if images:
        samples_png = plot_samples(scenario, run_dir / "samples.png")
        samples_html = f"""<h2>What each hospital's images look like</h2>
<img src="data:image/png;base64,{samples_png}" alt="sample images">"""
    anomaly_html = _anomaly_section(run_dir)
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
{_verdict_section(history, scenario, baseline)}
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
<p>Accuracy and ECE are the final model's decisions, calibrated on the training hospitals' validation cases,
at each hospital's prevalence: known from its training labels, or estimated from its images where it has none.</p>
<div id="hospitals">{_table(["hospital", "role", "shortcut correlation", "prevalence", "val AUROC (selected)",
         "test AUROC (selected)", "test AUROC (final)", "calibrated accuracy (final)", "ECE (final)",
         "prevalence used", "DP epsilon spent"],
        _site_rows(history, scenario, selected))}</div>
<img src="data:image/png;base64,{auroc_png}" alt="AUROC per round">
<img src="data:image/png;base64,{loss_png}" alt="training risk per round">
{anomaly_html}
{provenance_html}
{_onboarding_section(run_dir)}
{samples_html}
<p>Files: <code>metrics.json</code> (every round, every hospital), <code>scenario.json</code>,
<code>model.pt</code> (final global model), <code>feature-moments.json</code>, <code>flower.log</code>.</p>
</body></html>"""
    path = run_dir / "report.html"
    path.write_text(page)
    return path
