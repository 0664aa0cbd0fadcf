"""Just enough of the Prometheus text format to read rmserve's batch metrics before and after
a run: the mean batch size and the padding ratio of the batches that run formed."""

from __future__ import annotations

import math

__all__ = ["batch_stats", "parse_metrics"]


def parse_metrics(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` for every sample line (comments skipped)."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if not key:
            continue
        try:
            samples[key.strip()] = float(value)
        except ValueError:
            continue
    return samples


def _total(samples: dict[str, float], name: str) -> float | None:
    """Sum of a metric over all its label sets; None when it is absent."""
    found = [v for k, v in samples.items() if k == name or k.startswith(name + "{")]
    return math.fsum(found) if found else None


def _delta(before: dict[str, float], after: dict[str, float], name: str) -> float | None:
    a = _total(after, name)
    if a is None:
        return None
    return a - (_total(before, name) or 0.0)


def batch_stats(before_text: str, after_text: str) -> dict[str, float | None]:
    """Mean batch size, mean padded tokens per batch, and padding ratio over the run.

    The padding ratio is padded tokens / real tokens: the sum of ``rmserve_batch_tokens``
    (batch size x longest item, per batch) over the tokens scored. Where the service exports
    ``rmserve_padding_ratio`` as a histogram only, its mean over the run's batches is used.
    """
    before, after = parse_metrics(before_text), parse_metrics(after_text)
    batches = _delta(before, after, "rmserve_batch_size_count")
    items = _delta(before, after, "rmserve_batch_size_sum")
    padded = _delta(before, after, "rmserve_batch_tokens_sum")
    real = None
    for name in (
        "rmserve_tokens_total",
        "rmserve_tokens_scored_total",
        "rmserve_real_tokens_total",
    ):
        real = _delta(before, after, name)
        if real is not None:
            break
    stats: dict[str, float | None] = {
        "batches": batches,
        "mean_batch_size": items / batches if batches and items is not None else None,
        "mean_batch_tokens": padded / batches if batches and padded is not None else None,
        "padding_ratio": padded / real if padded is not None and real else None,
    }
    if stats["padding_ratio"] is None:
        ratio_sum = _delta(before, after, "rmserve_padding_ratio_sum")
        ratio_count = _delta(before, after, "rmserve_padding_ratio_count")
        if ratio_sum is not None and ratio_count:
            stats["padding_ratio"] = ratio_sum / ratio_count
    return stats
