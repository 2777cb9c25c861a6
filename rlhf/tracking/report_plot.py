"""report.png, the sweep report's plot: gold and proxy reward against KL to the reference policy, one point per
setting. It is the reward over-optimisation picture of Gao et al. (2022), "Scaling Laws for Reward Model
Overoptimization"."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def setting_label(setting: dict[str, Any], setting_keys: list[str]) -> str:
    """`kl_coef=0.02`: the setting's swept values, each key shortened to its last part."""
    return " ".join(f"{key.rsplit('.', 1)[-1]}={setting[key]}" for key in setting_keys)


def plot(path: Path, settings: list[dict[str, Any]], setting_keys: list[str]) -> Path | None:
    """report.png: gold (left) and proxy (right) reward against KL, one point per setting (`settings`: the
    report's mean, min and max per setting; `setting_keys`: the swept keys other than the seed, for the labels)
    with min-max bars, starting from the SFT policy at KL 0. Nothing to plot (no evaluated job): no file, an old
    one removed."""
    if not settings:
        path.unlink(missing_ok=True)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    panels = (
        ("gold_reward", "gold reward (environment, ground truth)"),
        ("proxy_reward", "proxy reward (reward model score)"),
    )
    for ax, (name, title) in zip(axes, panels):
        _plot_panel(ax, settings, setting_keys, name)
        ax.set(
            title=title,
            xlabel="KL(policy || SFT reference), nats per episode",
            ylabel=f"mean {name.replace('_', ' ')}",
        )
        ax.grid(alpha=0.3)
    seeds = max(s["n"] for s in settings)
    note = f"; mean of up to {seeds} seeds per setting, bars min..max" if seeds > 1 else ""
    fig.suptitle(f"Reward over-optimisation across the sweep (cf. Gao et al. 2022){note}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_panel(ax: Any, settings: list[dict[str, Any]], setting_keys: list[str], name: str) -> None:
    """One reward on one axes: the SFT start (over all settings), then each setting, joined in order of KL."""
    ppo = [s for s in settings if f"ppo/{name} mean" in s]
    if not ppo:
        ax.text(0.5, 0.5, f"no ppo/{name} in this sweep", ha="center", va="center", transform=ax.transAxes)
        return
    sft = [s for s in settings if f"sft/{name} mean" in s]
    if sft:
        values = [s[f"sft/{name} mean"] for s in sft]
        mean = statistics.fmean(values)
        low = min(s[f"sft/{name} min"] for s in sft)
        high = max(s[f"sft/{name} max"] for s in sft)
        ax.errorbar(
            [0.0],
            [mean],
            yerr=[[mean - low], [high - mean]],
            fmt="s",
            color="black",
            capsize=3,
            label="SFT policy (start, KL 0)",
        )
    xs = [s["ppo/kl mean"] for s in ppo]
    ys = [s[f"ppo/{name} mean"] for s in ppo]
    ax.errorbar(
        xs,
        ys,
        xerr=[[x - s["ppo/kl min"] for x, s in zip(xs, ppo)], [s["ppo/kl max"] - x for x, s in zip(xs, ppo)]],
        yerr=[
            [y - s[f"ppo/{name} min"] for y, s in zip(ys, ppo)],
            [s[f"ppo/{name} max"] - y for y, s in zip(ys, ppo)],
        ],
        fmt="o",
        color="tab:blue" if name == "gold_reward" else "tab:orange",
        capsize=3,
        label="PPO policy, per setting",
    )
    start = [(0.0, mean)] if sft else []
    line = start + sorted(zip(xs, ys))
    ax.plot([p[0] for p in line], [p[1] for p in line], "-", color="gray", alpha=0.5, zorder=0)
    labels: dict[tuple[float, float], list[str]] = {}  # settings that landed on one point share one label
    for x, y, s in zip(xs, ys, ppo):
        labels.setdefault((x, y), []).append(setting_label(s, setting_keys))
    for point, names in labels.items():
        ax.annotate(", ".join(names), point, textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.margins(x=0.15)  # room for the labels right of the last point
    ax.legend(fontsize=8)
