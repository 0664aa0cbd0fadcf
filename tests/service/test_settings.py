"""ServiceSettings: environment names, safe defaults, refusal of unsafe combinations."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from rmserve.service.settings import ServiceSettings

DOCUMENTED = {
    "RMSERVE_BUNDLE", "RMSERVE_HOST", "RMSERVE_PORT", "RMSERVE_API_KEYS", "RMSERVE_OPEN_HEALTH",
    "RMSERVE_OPEN_METRICS", "RMSERVE_PRECISION", "RMSERVE_PROVIDER", "RMSERVE_INTRA_OP_THREADS",
    "RMSERVE_MAX_BATCH_SIZE", "RMSERVE_MAX_BATCH_TOKENS", "RMSERVE_MAX_WAIT_MS",
    "RMSERVE_MAX_QUEUE_ITEMS", "RMSERVE_MAX_ITEMS_PER_REQUEST", "RMSERVE_MAX_REQUEST_BYTES",
    "RMSERVE_MAX_ITEM_CHARS", "RMSERVE_DRAIN_TIMEOUT_S", "RMSERVE_LOG_LEVEL", "RMSERVE_LOG_JSON",
    "RMSERVE_CORS_ORIGINS", "RMSERVE_WARMUP",
}  # fmt: skip


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("RMSERVE_"):
            monkeypatch.delenv(key)


def test_the_documented_environment_names_exist() -> None:
    names = {"RMSERVE_" + name.upper() for name in ServiceSettings.model_fields}
    assert names >= DOCUMENTED
    for name, field in ServiceSettings.model_fields.items():
        assert field.description, name
        assert len(field.description) > 10, name


def test_defaults_are_safe() -> None:
    s = ServiceSettings()
    assert s.host == "127.0.0.1"
    assert s.api_key_list() == []
    assert s.cors_origin_list() == []
    assert s.max_queue_items >= s.max_batch_size
    assert s.max_batch_size == 0  # auto: chosen for the provider when the model is loaded
    assert s.model_instances == 0


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    key = "k" * 20
    monkeypatch.setenv("RMSERVE_BUNDLE", str(tmp_path))
    monkeypatch.setenv("RMSERVE_MAX_WAIT_MS", "12.5")
    monkeypatch.setenv("RMSERVE_API_KEYS", f"{key}, {key}x ")
    monkeypatch.setenv("RMSERVE_OPEN_METRICS", "false")
    monkeypatch.setenv("RMSERVE_CORS_ORIGINS", "https://a.example,https://b.example")
    s = ServiceSettings()
    assert s.bundle == tmp_path
    assert s.max_wait_ms == 12.5
    assert s.api_key_list() == [key, key + "x"]
    assert s.open_metrics is False
    assert s.cors_origin_list() == ["https://a.example", "https://b.example"]
    # The keys are a secret: not in the repr.
    assert key not in repr(s)
    # A keyword (a CLI flag) wins over the environment.
    assert ServiceSettings(max_wait_ms=1.0).max_wait_ms == 1.0


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"api_keys": "short"}, "at least 16"),
        ({"max_batch_size": 64, "max_queue_items": 10}, "max_queue_items"),
        ({"max_items_per_request": 5000, "max_queue_items": 4096}, "max_items_per_request"),
        ({"cors_origins": "*", "api_keys": "k" * 20}, "cors_origins"),
        ({"precision": "bf16"}, "precision"),
        ({"port": 70000}, "port"),
        ({"max_batch_size": -1}, "max_batch_size"),
        ({"model_instances": -1}, "model_instances"),
        ({"unknown_setting": 1}, "unknown_setting"),
    ],
)
def test_unsafe_or_invalid_settings_are_refused(overrides: dict[str, object], needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        ServiceSettings(**overrides)  # type: ignore[arg-type]
    assert needle in str(info.value)


def test_docs_table_lists_every_setting_and_metric() -> None:
    # The README carries the settings table and the metrics list (docs/architecture.md:
    # Configuration).
    docs = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name, field in ServiceSettings.model_fields.items():
        row = next(
            (line for line in docs.splitlines() if line.startswith(f"| `RMSERVE_{name.upper()}`")),
            None,
        )
        assert row is not None, f"RMSERVE_{name.upper()} missing from the README settings table"
        assert str(field.description) in row
    from rmserve.service.metrics import ServiceMetrics

    for metric in ServiceMetrics().registry.collect():
        shown = metric.name + ("_total" if metric.type == "counter" else "")
        assert f"`{shown}" in docs, shown
