"""The evaluation report's plots, drawn from the report alone (PNG, matplotlib's Agg backend): calibration
curves, AUC by meal slot, and replayed RPM and CTR per policy with their intervals."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display
import matplotlib.pyplot as plt  # noqa: E402

ORACLE = "oracle"


def _scored(report: dict) -> dict[str, dict]:
    rows = dict(report["models"])
    if ORACLE in report:
        rows[ORACLE] = report[ORACLE]
    return rows


def calibration_plot(report: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    top = 0.0
    for name, m in _scored(report).items():
        curve = m["calibration_curve"]
        ax.plot(curve["predicted"], curve["observed"], marker="o", label=name)
        top = max(top, *curve["predicted"], *curve["observed"])
    ax.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="perfect")
    ax.set(xlabel="mean predicted CTR (equal-count bins)", ylabel="observed CTR",
           title=f"Calibration on {report['split']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def meal_slot_plot(report: dict, path: Path) -> None:
    rows = _scored(report)
    slots = list(dict.fromkeys(s for m in rows.values() for s in m["auc_by_meal_slot"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(rows), 1)
    for i, (name, m) in enumerate(rows.items()):
        values = [m["auc_by_meal_slot"].get(s) or 0.0 for s in slots]
        ax.bar([j + i * width for j in range(len(slots))], values, width, label=name)
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(slots))], slots)
    ax.set(ylabel="AUC", ylim=(0.5, 1.0), title="AUC by meal slot (TAUC)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def revenue_plot(revenue: dict, path: Path) -> None:
    """SNIPS RPM and CTR per policy with their bootstrap intervals, and the exact values when known."""
    names = list(revenue["policies"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, scale, label in ((axes[0], "rpm", 1.0, "RPM"), (axes[1], "ctr", 100.0, "CTR (%)")):
        values = [revenue["policies"][n]["snips"][metric] * scale for n in names]
        # a bootstrap percentile interval need not contain the point estimate (few clicks): no negative bars
        lows = [max(v - revenue["policies"][n]["snips"][f"{metric}_interval"][0] * scale, 0.0)
                for n, v in zip(names, values)]
        highs = [max(revenue["policies"][n]["snips"][f"{metric}_interval"][1] * scale - v, 0.0)
                 for n, v in zip(names, values)]
        ax.bar(names, values, yerr=[lows, highs], capsize=4, color="tab:blue", label="SNIPS estimate")
        exact = [(i, revenue["policies"][n]["exact"][metric] * scale) for i, n in enumerate(names)
                 if "exact" in revenue["policies"][n]]
        if exact:
            ax.scatter([i for i, _ in exact], [v for _, v in exact], color="black", marker="_", s=400, zorder=3,
                       label="exact (simulator)")
        ax.set(ylabel=label, title=f"{label} by policy, replayed")
        ax.tick_params(axis="x", rotation=20)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(report: dict, out: Path) -> list[Path]:
    paths = [out / "calibration.png", out / "auc_by_meal_slot.png"]
    calibration_plot(report, paths[0])
    meal_slot_plot(report, paths[1])
    if report.get("revenue"):
        paths.append(out / "revenue.png")
        revenue_plot(report["revenue"], paths[-1])
    return paths
