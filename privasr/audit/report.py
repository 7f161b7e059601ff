"""The memorization section of a report: accuracy vs repetitions per training policy, and
score histograms of inserted vs held-out canaries."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Mapping

from privasr.atomic import atomic_write_text
from privasr.report.html import png_data_uri, html_table, plt


def memorization_figures(results: Mapping[str, dict]) -> dict[str, str]:
    """Base64 PNGs: exact match vs r (one line per policy, held-out dashed) and, per policy,
    CTC-loss histograms of inserted vs held-out canaries."""
    figs = {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for metric, ax, label in (("exact_match", axes[0], "exact match %"),
                              ("cer", axes[1], "CER %")):
        for name, res in results.items():
            rows = [r for r in res["by_repetitions"] if r[f"inserted_{metric}"] is not None]
            line, = ax.plot([r["repetitions"] for r in rows],
                            [100 * r[f"inserted_{metric}"] for r in rows], "o-", label=name)
            ax.axhline(100 * res[f"heldout_{metric}"], ls="--", color=line.get_color(), lw=1,
                       label=f"{name} held-out")
        ax.set(xscale="log", xlabel="repetitions r in training", ylabel=label, ylim=(-3, 103),
               title=f"Canary {label.split(' %')[0]}: inserted vs held-out (dashed)")
        ax.set_xticks([1, 2, 4, 8, 16], ["1", "2", "4", "8", "16"])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figs["accuracy vs repetitions"] = png_data_uri(fig)
    for name, res in results.items():
        fig, ax = plt.subplots(figsize=(6, 3))
        ins = [s["loss"] for s in res["scores"] if s["inserted"]]
        out = [s["loss"] for s in res["scores"] if not s["inserted"]]
        ax.hist([ins, out], bins=20, label=["inserted", "held-out"], alpha=0.8)
        ax.set(xlabel="CTC loss per label", ylabel="canaries", title=f"{name}: canary CTC losses")
        ax.legend()
        figs[f"scores {name}"] = png_data_uri(fig)
    return figs


def memorization_section(results: Mapping[str, dict]) -> str:
    """HTML: a summary table per policy, the by-r tables, and the figures."""
    summary = [{"policy": name, "inserted EM": r["inserted_exact_match"],
                "held-out EM": r["heldout_exact_match"], "AUC": r["auc"],
                "TPR@1%FPR": r["tpr_at_1pct_fpr"], "ε lower bound": r["one_run"]["epsilon"],
                "confidence": r["one_run"]["confidence"]} for name, r in results.items()]
    parts = ["<h2>Memorization audit</h2>", html_table(summary)]
    for name, r in results.items():
        rows = [{k: v for k, v in row.items()} for row in r["by_repetitions"]]
        parts.append(f"<h3>{html.escape(name)}: by repetitions</h3>{html_table(rows)}")
    for title, b64 in memorization_figures(results).items():
        parts.append(f'<h3>{html.escape(title)}</h3><img alt="{html.escape(title)}" '
                     f'src="data:image/png;base64,{b64}">')
    return "".join(parts)


def write_audit_report(results: Mapping[str, dict], path: str | Path) -> Path:
    style = ("body{font-family:sans-serif;max-width:900px;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}")
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>privasr memorization audit"
           f"</title><style>{style}</style></head><body>{memorization_section(results)}"
           f"</body></html>")
    path = Path(path)
    atomic_write_text(path, doc)
    return path
