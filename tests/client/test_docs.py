"""The code in docs/integrations.md runs: the verl reward function file, against the service."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from rmserve.client import RewardClient

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"


def python_block(first_line: str) -> str:
    """The ```python block of the doc whose first line is ``first_line``."""
    for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL):
        if block.startswith(first_line + "\n"):
            return str(block)
    raise AssertionError(f"no python block starting with {first_line!r} in {DOC}")


def test_verl_reward_function_from_the_docs(
    service_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "rmserve_verl_reward.py"
    path.write_text(python_block("# rmserve_verl_reward.py"))
    monkeypatch.setenv("RMSERVE_BASE_URL", service_url)
    spec = importlib.util.spec_from_file_location("rmserve_verl_reward", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    question, answer = "What is the capital of France?", "Paris."
    # The arguments verl's reward managers pass (the reward loop adds two keyword ones).
    score = module.compute_score(
        data_source="hh",
        solution_str=answer,
        ground_truth=None,
        extra_info={"question": question},
        reward_router_address=None,
        reward_model_tokenizer=None,
    )
    with RewardClient(service_url) as client:
        expected = client.score([question], [answer]).scores[0]
    assert isinstance(score, float)
    assert abs(score - expected) < 1e-6
    module._client.close()
