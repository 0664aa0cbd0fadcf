"""``rmserve eval --report DIR``: report.md with three PNG plots, four for an ensemble.

- ``rewards.png``: histograms of r(chosen) and r(rejected);
- ``accuracy_by_length.png``: accuracy per quintile of the pair's response length;
- ``calibration.png``: reliability of sigmoid(r_w - r_l) as the probability of preference;
- ``accuracy_by_uncertainty.png`` (ensembles): the mean's accuracy per quartile of the pairs'
  uncertainty (the std over members of the margin, that std relative to the mean's |margin|,
  and a small |margin| as the baseline), with each member's accuracy in a table.

For an ensemble the first three show the members' mean reward.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rmserve.training.pairs import PairScores

__all__ = ["calibration_bins", "length_bins", "write_report"]


def length_bins(scores: PairScores, bins: int = 5) -> list[tuple[int, int, float, int]]:
    """(min chars, max chars, accuracy, pairs) per quantile bin of the mean response length."""
    import numpy as np

    length = (scores.chosen_chars + scores.rejected_chars) / 2  # (P,)
    correct = (scores.chosen > scores.rejected).astype(np.float64)
    order = np.argsort(length, kind="stable")
    out = []
    for chunk in np.array_split(order, min(bins, len(order))):
        if len(chunk):
            out.append(
                (
                    int(length[chunk].min()),
                    int(length[chunk].max()),
                    float(correct[chunk].mean()),
                    len(chunk),
                )
            )
    return out


def calibration_bins(scores: PairScores, bins: int = 10) -> list[tuple[float, float, int]]:
    """(mean predicted, observed frequency, count) per bin of p = sigmoid(r_a - r_b).

    Each pair enters twice, once per orientation, (p, 1) for chosen-vs-rejected and
    (1 - p, 0) for the reverse, so that the diagram covers the whole [0, 1] range.
    """
    import numpy as np

    from rmserve.activations import sigmoid

    p = sigmoid(scores.chosen - scores.rejected)  # (P,)
    predicted = np.concatenate([p, 1.0 - p])
    observed = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(predicted, edges) - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        mask = index == b
        if mask.any():
            out.append(
                (float(predicted[mask].mean()), float(observed[mask].mean()), int(mask.sum()))
            )
    return out


def write_report(out_dir: Path, scores: PairScores, metrics: dict[str, Any]) -> Path:
    """Write the plots and report.md into ``out_dir``; returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot

    out_dir.mkdir(parents=True, exist_ok=True)
    by_length = length_bins(scores)
    calibration = calibration_bins(scores)
    _plot_rewards(out_dir / "rewards.png", scores)
    _plot_accuracy_by_length(out_dir / "accuracy_by_length.png", by_length)
    _plot_calibration(out_dir / "calibration.png", calibration)
    ensemble = metrics.get("ensemble")
    if ensemble is not None:
        _plot_uncertainty(out_dir, ensemble)
    lines = _summary_lines(metrics, by_length, calibration)
    if ensemble is not None:
        lines += _ensemble_section(metrics["accuracy"], ensemble)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _plot_rewards(path: Path, scores: PairScores) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    both = np.concatenate([scores.chosen, scores.rejected])
    edges = np.linspace(both.min(), both.max() + 1e-9, 31)
    ax.hist(scores.chosen, bins=edges.tolist(), alpha=0.6, label="chosen")
    ax.hist(scores.rejected, bins=edges.tolist(), alpha=0.6, label="rejected")
    ax.set(xlabel="reward", ylabel="responses", title="Rewards of chosen vs rejected")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_accuracy_by_length(path: Path, by_length: list[tuple[int, int, float, int]]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"{lo}-{hi}" for lo, hi, _, _ in by_length]
    ax.bar(labels, [acc for _, _, acc, _ in by_length])
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set(
        xlabel="mean response length (characters)",
        ylabel="accuracy",
        ylim=(0, 1),
        title="Accuracy by length",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_calibration(path: Path, calibration: list[tuple[float, float, int]]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    ax.plot([c[0] for c in calibration], [c[1] for c in calibration], marker="o", label="model")
    ax.set(
        xlabel="predicted sigmoid(r_a - r_b)",
        ylabel="observed P(a preferred)",
        xlim=(0, 1),
        ylim=(0, 1),
        title="Calibration",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _summary_lines(
    metrics: dict[str, Any],
    by_length: list[tuple[int, int, float, int]],
    calibration: list[tuple[float, float, int]],
) -> list[str]:
    """report.md up to the ensemble section: the headline metrics, then each plot's table."""
    return [
        "# Reward model evaluation",
        "",
        f"- model: `{metrics.get('model')}` ({metrics.get('kind')}, {metrics.get('precision')})",
        f"- data: `{metrics.get('data')}` ({metrics['n']} pairs, {metrics.get('skipped', 0)} "
        f"malformed rows skipped, {metrics.get('truncated', 0)} responses truncated)",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy | {metrics['accuracy']:.4f} |",
        f"| shorter response wins (baseline) | {metrics['shorter_wins_accuracy']:.4f} |",
        f"| mean margin r(chosen) - r(rejected) | {metrics['mean_margin']:.4f} |",
        "",
        "## Rewards",
        "",
        "![rewards](rewards.png)",
        "",
        "## Accuracy by length",
        "",
        "| mean response length (chars) | pairs | accuracy |",
        "|---|---|---|",
        *[f"| {lo}-{hi} | {n} | {acc:.3f} |" for lo, hi, acc, n in by_length],
        "",
        "![accuracy by length](accuracy_by_length.png)",
        "",
        "## Calibration of sigmoid(r_w - r_l)",
        "",
        "| predicted | observed | count |",
        "|---|---|---|",
        *[f"| {pred:.3f} | {obs:.3f} | {n} |" for pred, obs, n in calibration],
        "",
        "![calibration](calibration.png)",
        "",
    ]


# The quartile tables of rmserve eval's ensemble block, in the order the report shows them.
UNCERTAINTY_MEASURES = {
    "accuracy_by_std_quartile": "std of the margin",
    "accuracy_by_relative_std_quartile": "std / |mean margin|",
    "accuracy_by_small_margin_quartile": "small |mean margin| (no ensemble needed)",
}


def _plot_uncertainty(out_dir: Path, ensemble: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    quarters = len(ensemble["accuracy_by_std_quartile"])
    width = 0.8 / len(UNCERTAINTY_MEASURES)
    for i, (key, label) in enumerate(UNCERTAINTY_MEASURES.items()):
        accuracy = [b["accuracy"] for b in ensemble[key]]
        ax.bar(np.arange(quarters) + (i - 1) * width, accuracy, width, label=label)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(quarters), [f"Q{q + 1}" for q in range(quarters)])
    ax.set(
        xlabel="quartile of the pair's uncertainty (Q1: least uncertain)",
        ylabel="accuracy of the ensemble mean",
        ylim=(0, 1),
        title="Does disagreement predict mistakes?",
    )
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out_dir / "accuracy_by_uncertainty.png", dpi=100)
    plt.close(fig)


def _ensemble_section(accuracy: float, ensemble: dict[str, Any]) -> list[str]:
    disagreement = ensemble["disagreement"]
    members = ensemble["member_accuracy"]
    quarters = len(ensemble["accuracy_by_std_quartile"])
    rows = []
    for key, label in UNCERTAINTY_MEASURES.items():
        bins = ensemble[key]
        cells = " | ".join(f"{b['accuracy']:.3f}" for b in bins)
        gap = (bins[0]["accuracy"] - bins[-1]["accuracy"]) * 100
        cell = label.replace("|", "\\|")  # a bare | would end the table cell
        rows.append(f"| {cell} | {cells} | {gap:+.1f} |")
    return [
        f"## Ensemble of {ensemble['members']} members",
        "",
        "The rewards above are the members' mean.",
        "",
        "| member | accuracy |",
        "|---|---|",
        *[f"| {k} | {acc:.4f} |" for k, acc in enumerate(members)],
        f"| mean of members (the ensemble) | {accuracy:.4f} |",
        f"| members' average | {sum(members) / len(members):.4f} |",
        "",
        "| disagreement | value |",
        "|---|---|",
        *[f"| {name} | {value:.4f} |" for name, value in disagreement.items()],
        "",
        "### Accuracy by uncertainty",
        "",
        "Accuracy of the mean per quartile of each measure of a pair's uncertainty, least "
        "uncertain first (pairs per quartile: "
        f"{', '.join(str(b['pairs']) for b in ensemble['accuracy_by_std_quartile'])}). The "
        "margin is r(chosen) - r(rejected); its std is over members. Q1 - Q4 > 0: the measure "
        "predicts mistakes.",
        "",
        "| measure | " + " | ".join(f"Q{q + 1}" for q in range(quarters)) + " | Q1 - Q4 (points) |",
        "|---|" + "---|" * quarters + "---|",
        *rows,
        "",
        "| members | pairs | accuracy |",
        "|---|---|---|",
        *[
            f"| {name} | {part['pairs']} | {part['accuracy']:.3f} |"
            for name, part in ensemble["accuracy_by_agreement"].items()
        ],
        "",
        "![accuracy by uncertainty](accuracy_by_uncertainty.png)",
        "",
    ]
