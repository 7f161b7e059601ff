"""The DP-PEFT report: the WER × ε × method table and a WER-vs-ε plot, one HTML file."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from privasr.atomic import atomic_write_text
from privasr.report.html import _png, _table, plt

__all__ = ["wer_vs_epsilon_figure", "write_peft_report"]

COLUMNS = ("method", "epsilon", "delta", "test_wer", "test_cer", "trainable_params",
           "step_seconds", "noise_multiplier", "steps", "lr")


def wer_vs_epsilon_figure(rows: list[dict[str, Any]]) -> str | None:
    """Base64 PNG: test WER against ε per DP method; zero-shot and non-private as lines."""
    dp = [r for r in rows if r.get("epsilon") is not None]
    flat = [r for r in rows if r.get("epsilon") is None]
    if not dp and not flat:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for m in dict.fromkeys(r["method"] for r in dp):
        pts = sorted((r["epsilon"], 100 * r["test_wer"]) for r in dp if r["method"] == m)
        ax.plot([e for e, _ in pts], [w for _, w in pts], "o-", label=f"DP {m}")
    for r, style in zip(flat, ("--", ":", "-.")):
        label = "zero-shot (public model)" if r["method"] == "zero_shot" else \
            f"non-private {r['method']}"
        ax.axhline(100 * r["test_wer"], ls=style, color="gray", label=label)
    if dp:
        ax.set_xscale("log")
        eps = sorted({r["epsilon"] for r in dp})
        ax.set_xticks(eps, [f"{e:g}" for e in eps])
        ax.minorticks_off()
    ax.set(xlabel="ε (δ = 1/N_private)", ylabel="test WER % (private speakers, greedy)",
           title="DP fine-tuning: WER vs ε")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def write_peft_report(out_dir: str | Path, rows: list[dict[str, Any]],
                      summary: dict[str, Any]) -> Path:
    out = Path(out_dir)
    table = [{c: r.get(c) for c in COLUMNS} for r in rows]
    fig = wer_vs_epsilon_figure(rows)
    parts = ["<h1>DP parameter-efficient fine-tuning</h1>",
             "<p>Pre-trained on the public side of the split, fine-tuned on the private side "
             "(new speakers, accents, speaking rate and text domain); WER on the private test "
             "speakers. ε per example at δ = 1/N_private; step_seconds is the median time of "
             "the gradient step (per-example gradients, clipping, noise).</p>",
             f"<h2>Results</h2>{_table(table)}"]
    if fig:
        parts.append(f'<h2>WER vs ε</h2><img alt="WER vs epsilon" '
                     f'src="data:image/png;base64,{fig}">')
    parts.append(f"<h2>Summary</h2><pre>{html.escape(json.dumps(summary, indent=1))}</pre>")
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}")
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>DP-PEFT</title>"
           f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    path = out / "report.html"
    atomic_write_text(path, doc)
    return path
