"""The DP-PEFT report: the WER × ε × method table and a WER-vs-ε plot, one HTML file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from privasr.report.html import png_data_uri, plt, write_report

__all__ = ["wer_vs_epsilon_figure", "write_peft_report"]

COLUMNS = ("method", "epsilon", "delta", "test_wer", "test_cer", "trainable_params",
           "step_seconds", "noise_multiplier", "steps", "lr")
NOTES = ("Pre-trained on the public side of the split, fine-tuned on the private side (new "
         "speakers, accents, speaking rate and text domain); greedy WER on the private test "
         "speakers. ε per example at δ = min(1e-5, N^-1.1) (null: non-private). step_seconds is the "
         "median time of the gradient step (per-example gradients, clipping, noise).")


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
    ax.set(xlabel="ε (δ = min(1e-5, N^-1.1))", ylabel="test WER % (private speakers, greedy)",
           title="DP fine-tuning: WER vs ε")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_data_uri(fig)


def write_peft_report(out_dir: str | Path, rows: list[dict[str, Any]],
                      summary: dict[str, Any]) -> Path:
    """``out_dir/report.html``: the results table, the summary and the WER-vs-ε plot."""
    fig = wer_vs_epsilon_figure(rows)
    return write_report(out_dir, "DP parameter-efficient fine-tuning",
                        {"Results": [{c: r.get(c) for c in COLUMNS} for r in rows],
                         "Summary": [summary] if summary else []},
                        notes=NOTES, figures={"WER vs ε": fig} if fig else None)
