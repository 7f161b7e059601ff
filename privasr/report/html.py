"""The run report: matplotlib figures of the curves people look at, in one HTML file."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from privasr.atomic import atomic_write_text  # noqa: E402
from privasr.report.metrics_log import MetricsLogger  # noqa: E402


def png_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def training_figures(run_dir: str | Path) -> dict[str, str]:
    """Base64 PNGs of the training loss and the dev WER/CER curves of a run."""
    log = MetricsLogger(run_dir, tensorboard=False)
    train, dev = log.read("train"), log.read("dev")
    figs = {}
    if train and "loss" in train[0]:   # a DP run withholds the private batches' loss
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
        if dev:
            ax.plot([r["step"] for r in dev], [r["loss"] for r in dev], "o-", label="dev")
        ax.set(xlabel="step", ylabel="CTC loss / label", title="Loss", yscale="log")
        ax.legend()
        ax.grid(alpha=0.3)
        figs["loss"] = png_data_uri(fig)
    if dev:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in dev], [100 * r["wer"] for r in dev], "o-", label="WER")
        ax.plot([r["step"] for r in dev], [100 * r["cer"] for r in dev], "s-", label="CER")
        ax.set(xlabel="step", ylabel="%", title="Dev error rates (greedy)")
        ax.legend()
        ax.grid(alpha=0.3)
        figs["wer"] = png_data_uri(fig)
    if train and "frac_clipped" in train[0]:
        figs["clipping"] = _clipping_figure(train)
    return figs


def _clipping_figure(train: list[dict[str, float]]) -> str:
    """Per-unit gradient norms (10/50/90 % quantiles) against the bound in force, and the
    fraction of units clipped, per logged step."""
    steps = [r["step"] for r in train]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    for key, style in (("norm_p10", ":"), ("norm_p50", "-"), ("norm_p90", "--")):
        a.plot(steps, [r[key] for r in train], style, color="C0", label=key.replace("norm_", ""))
    a.plot(steps, [r["bound"] for r in train], color="C3", label="bound")
    a.set(xlabel="step", ylabel="L2 norm", title="Unit gradient norms vs bound", yscale="log")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    b.plot(steps, [100 * r["frac_clipped"] for r in train], color="C2")
    b.set(xlabel="step", ylabel="%", title="Units clipped", ylim=(-2, 102))
    b.grid(alpha=0.3)
    return png_data_uri(fig)


def html_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def write_report(run_dir: str | Path, title: str, tables: dict[str, list[dict[str, Any]]],
                 notes: str = "", sections: list[str] = (),
                 figures: dict[str, str] | None = None) -> Path:
    """Write ``run_dir/report.html`` with the given tables, the run's curves, ``figures``
    (title -> base64 PNG) and extra HTML ``sections`` (e.g.
    ``privasr.audit.report.memorization_section``)."""
    run_dir = Path(run_dir)
    figs = {**training_figures(run_dir), **(figures or {})}
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if notes:
        parts.append(f"<p>{html.escape(notes)}</p>")
    for name, rows in tables.items():
        parts.append(f"<h2>{html.escape(name)}</h2>{html_table(rows)}")
    for name, b64 in figs.items():
        parts.append(f'<h2>{name}</h2><img alt="{name}" src="data:image/png;base64,{b64}">')
    parts.extend(sections)
    style = ("body{font-family:sans-serif;max-width:900px;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}")
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
    path = run_dir / "report.html"
    atomic_write_text(path, doc)
    return path
