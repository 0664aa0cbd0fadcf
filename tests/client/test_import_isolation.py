"""rmserve.client imports and works with httpx alone: no torch, numpy, fastapi, onnxruntime.

Two checks, both in a fresh interpreter:

- a meta-path blocker makes importing any heavy package raise, then the client is imported
  and used (sync, async, TRL function, best-of-n) against a mock transport;
- a new virtual environment that holds only httpx and its own dependencies (copied from the
  installed distributions, so no network is needed), where torch and friends do not exist.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

HEAVY = (
    "torch",
    "numpy",
    "fastapi",
    "starlette",
    "onnxruntime",
    "onnx",
    "pydantic",
    "transformers",
    "tokenizers",
    "uvicorn",
    "trl",
)

# Imports the client and drives every entry point offline. Fails (exit != 0) on any error.
EXERCISE = textwrap.dedent(
    """
    import asyncio
    import sys

    import httpx

    import rmserve.client as rc

    def handler(request):
        import json
        body = json.loads(request.content or b"{}")
        if request.url.path == "/v1/score":
            n = len(body["items"])
            return httpx.Response(200, json={
                "model": "m", "scores": [float(i) for i in range(n)],
                "truncated": [False] * n, "usage": {"tokens": n}})
        if request.url.path == "/v1/rank":
            n = len(body["responses"])
            return httpx.Response(200, json={
                "model": "m", "ranking": [{"index": i, "score": -i} for i in range(n)],
                "scores": [-i for i in range(n)], "truncated": [False] * n,
                "usage": {"tokens": n}})
        return httpx.Response(404, json={"error": {"type": "not_found", "message": "no"}})

    client = rc.RewardClient("http://rm:8000", transport=httpx.MockTransport(handler),
                             max_items_per_request=2)
    assert client.score(["a", "b", "c"], ["x", "y", "z"]).scores == (0.0, 1.0, 0.0)
    assert rc.best_of_n(client, "p", ["x", "y"]).best_index == 0
    func = rc.trl_reward_func(client=client, name="rm")
    assert func(prompts=["p"], completions=["c"]) == [0.0]
    try:
        client.models()
    except rc.NotFoundError as e:
        assert e.status_code == 404
    else:
        raise AssertionError("404 did not raise NotFoundError")

    async def main():
        async with rc.AsyncRewardClient(
            "http://rm:8000", transport=httpx.MockTransport(handler), max_items_per_request=1
        ) as aclient:
            result = await aclient.score(["a", "b"], ["x", "y"])
            assert result.scores == (0.0, 0.0)

    asyncio.run(main())
    heavy = __HEAVY__
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
    assert not loaded, f"heavy modules imported: {loaded}"
    ours = sorted(m for m in sys.modules if m.startswith(("rmserve.service", "rmserve.training")))
    assert not ours, f"server/training modules imported: {ours}"
    print("client ok")
    """
).replace("__HEAVY__", repr(set(HEAVY)))

BLOCKER = textwrap.dedent(
    """
    import sys

    class BlockHeavy:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in __HEAVY__:
                raise ImportError(f"{name} is blocked: rmserve.client must not import it")
            return None

    sys.meta_path.insert(0, BlockHeavy())
    """
).replace("__HEAVY__", repr(set(HEAVY)))


def _run(python: str, code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_client_works_with_heavy_packages_blocked() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = _run(sys.executable, BLOCKER + EXERCISE, env)
    assert result.returncode == 0, result.stderr
    assert "client ok" in result.stdout


def _requirement_closure(root: str) -> set[str]:
    """``root`` and the distributions it needs (extras skipped), as installed here."""
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        for requirement in importlib.metadata.requires(name) or []:
            if "extra ==" in requirement:
                continue
            dependency = re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0]
            try:
                importlib.metadata.distribution(dependency)
            except importlib.metadata.PackageNotFoundError:
                continue  # a marker excluded it on this Python
            todo.append(dependency)
    return seen


@pytest.mark.slow
def test_client_in_a_fresh_venv_with_only_httpx(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    distributions = _requirement_closure("httpx")
    assert {"httpx", "httpcore", "h11", "anyio", "idna", "certifi"} <= distributions
    for name in distributions:
        distribution = importlib.metadata.distribution(name)
        for file in distribution.files or []:
            source = Path(str(distribution.locate_file(file)))
            if source.is_file() and ".." not in file.parts:
                target = site / file
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
    (site / "rmserve_repo.pth").write_text(str(REPO_ROOT) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    probe = "\n".join(
        [
            "import importlib.util",
            f"missing = [m for m in {HEAVY!r} if importlib.util.find_spec(m) is None]",
            f"assert missing == list({HEAVY!r}), missing",
        ]
    )
    result = _run(str(python), probe + "\n" + EXERCISE, env)
    assert result.returncode == 0, result.stderr
    assert "client ok" in result.stdout
