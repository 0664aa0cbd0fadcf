"""ServiceSettings: environment names, safe defaults, refusal of unsafe combinations."""

from __future__ import annotations

import re
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


SERVICE_DOC = Path(__file__).resolve().parents[2] / "docs" / "service.md"


def doc_section(markdown: str, title: str) -> str:
    """The text of the ``## title`` section of ``markdown``, up to the next ``## `` heading."""
    lines = markdown.splitlines()
    start = lines.index(f"## {title}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end])


def table_rows(section: str) -> dict[str, str]:
    """The rows of the tables of ``section`` by their first cell's code name (the text in
    backticks up to a ``{`` of labels): ``| `RMSERVE_PORT` | ...`` is ``RMSERVE_PORT``."""
    rows: dict[str, str] = {}
    for line in section.splitlines():
        match = re.match(r"\| `([^`{]+)", line)
        if match:
            assert match.group(1) not in rows, f"{match.group(1)} has two rows"
            rows[match.group(1)] = line
    return rows


def test_doc_section_and_rows_are_read_from_their_section_only() -> None:
    doc = "## Settings\n| `RMSERVE_A` | x |\n\n## Metrics\n| `m_total{a}` | counter |\n"
    assert table_rows(doc_section(doc, "Settings")) == {"RMSERVE_A": "| `RMSERVE_A` | x |"}
    assert list(table_rows(doc_section(doc, "Metrics"))) == ["m_total"]


def test_docs_table_lists_every_setting_and_metric() -> None:
    """docs/service.md's Settings table has one row per setting, with the field's description
    word for word, and its Metrics table one row per metric (docs/architecture.md:
    Configuration); no row names something that does not exist."""
    doc = SERVICE_DOC.read_text(encoding="utf-8")
    settings = table_rows(doc_section(doc, "Settings"))
    expected = {
        f"RMSERVE_{name.upper()}": field for name, field in ServiceSettings.model_fields.items()
    }
    assert sorted(settings) == sorted(expected), (
        "docs/service.md's settings table is not the settings"
    )
    for variable, field in expected.items():
        assert f"| {field.description} |" in settings[variable], variable
    from rmserve.service.metrics import ServiceMetrics

    metrics = table_rows(doc_section(doc, "Metrics"))
    shown = {
        metric.name + ("_total" if metric.type == "counter" else "")
        for metric in ServiceMetrics().registry.collect()
    }
    assert sorted(metrics) == sorted(shown), "docs/service.md's metrics table is not the metrics"
