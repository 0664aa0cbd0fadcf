"""Prometheus metrics of the service, in a registry of their own per app.

A registry per app (not the process-global one) lets several apps live in one process, as
the tests do. Names (docs/architecture.md: The wire API; docs/service.md: Metrics):

    rmserve_requests_total{route,status}        counter
    rmserve_request_duration_seconds{route}     histogram
    rmserve_items_total                         counter: items scored
    rmserve_tokens_total                        counter: real (unpadded) tokens scored
    rmserve_shared_prefix_tokens_total          counter: of those, prompt tokens computed once
    rmserve_truncated_items_total               counter: items cut to fit max_length
    rmserve_refused_items_total{reason}         counter: items that could not be scored
    rmserve_member_std                          summary: ensemble members' std per item
    rmserve_queue_items                         gauge: items waiting for a batch
    rmserve_batch_size                          histogram: items per batch
    rmserve_batch_tokens                        histogram: padded tokens per batch
    rmserve_padding_ratio                       histogram: padded / computed tokens per batch
    rmserve_inference_duration_seconds          histogram: model time per batch
    rmserve_model_info{model,precision,provider} gauge, always 1
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from rmserve.service.batcher import BatchStats

__all__ = ["CONTENT_TYPE_LATEST", "ServiceMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_BATCH_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
_PADDING_BUCKETS = (1.0, 1.05, 1.1, 1.15, 1.25, 1.5, 2.0, 3.0, 5.0)


class ServiceMetrics:
    """The service's metrics, registered in ``self.registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "rmserve_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.request_duration = Histogram(
            "rmserve_request_duration_seconds",
            "HTTP request duration by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.items = Counter("rmserve_items", "Items scored", registry=r)
        self.tokens = Counter("rmserve_tokens", "Real (unpadded) tokens scored", registry=r)
        self.shared_tokens = Counter(
            "rmserve_shared_prefix_tokens",
            "Tokens of rmserve_tokens not computed: prompts shared by several items of a "
            "batch, computed once (prefix reuse)",
            registry=r,
        )
        self.truncated_items = Counter(
            "rmserve_truncated_items",
            "Items cut to fit max_length (prompt tokens, or a response's end where allowed)",
            registry=r,
        )
        self.refused_items = Counter(
            "rmserve_refused_items",
            "Items that could not be scored, by reason (response_too_long, item_too_long, "
            "invalid_item), whether their request failed or answered the others",
            ["reason"],
            registry=r,
        )
        # A summary's _sum / _count is the mean std of scored items (rate() them for a window).
        self.member_std = Summary(
            "rmserve_member_std",
            "Standard deviation of an ensemble's members per scored item (0 for one model)",
            registry=r,
        )
        self.queue_items = Gauge("rmserve_queue_items", "Items waiting for a batch", registry=r)
        self.batch_size = Histogram(
            "rmserve_batch_size", "Items per model batch", buckets=_BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "rmserve_batch_tokens",
            "Padded tokens (items x longest) per model batch",
            buckets=_BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.padding_ratio = Histogram(
            "rmserve_padding_ratio",
            "Padded tokens / computed tokens per model batch (a shared prompt counts once)",
            buckets=_PADDING_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "rmserve_inference_duration_seconds",
            "Model time per batch (packing included)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "rmserve_model_info",
            "The model being served (value 1)",
            ["model", "precision", "provider"],
            registry=r,
        )

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.batch_tokens.observe(stats.padded_tokens)
        computed = stats.real_tokens - stats.shared_tokens  # a shared prompt counts once
        self.padding_ratio.observe(stats.padded_tokens / max(1, computed))
        self.inference_duration.observe(stats.inference_s)
        self.items.inc(stats.size)
        self.tokens.inc(stats.real_tokens)
        self.shared_tokens.inc(stats.shared_tokens)

    def observe_std(self, std: npt.NDArray[np.float64]) -> None:
        """One observation per scored item: the mean is rmserve_member_std_sum / _count."""
        for value in std.tolist():
            self.member_std.observe(value)

    def set_queue_items(self, n: int) -> None:
        self.queue_items.set(n)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.request_duration.labels(route=route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
