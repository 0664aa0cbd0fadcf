"""The ``naive-torch`` baseline: what RL repositories commonly run as a remote reward model.

A FastAPI app that loads the transformers checkpoint in torch and runs the model once per
request, on that request's items only: no batching across requests. Like OpenRLHF's
``serve_rm.py``, the handler is ``async`` and calls the model directly, so requests are served
one at a time (a threaded handler would run several forwards at once and oversubscribe the
cores, which is slower on a CPU, not faster).

Fair to it: ``torch.inference_mode``, the same intra-op thread count as rmserve (the harness
also sets ``OMP_WAIT_POLICY=PASSIVE``, without which torch's spinning threads slowed a forward
5-10x whenever another process wanted the cores), and the same
text (``rmserve.formatting.render`` with the bundle's text format) and truncation
(``rmserve.encoding.PairEncoder`` over the bundle's tokenizer) as the service, so both score
the very same token ids. A request with several items (grpo8) runs as one padded batch.

Run: ``python -m benchmarks.naive_torch_server --checkpoint DIR --bundle DIR --port 8001``.
"""

# No ``from __future__ import annotations``: FastAPI must resolve ``Request`` in the
# handlers' signatures, and it is imported inside build_app (torch and fastapi load lazily).
import argparse
import os
from pathlib import Path
from typing import Any

__all__ = ["build_app", "main"]


def build_app(checkpoint: Path, bundle: Path, threads: int, dtype: str, device: str) -> Any:
    import torch
    from fastapi import FastAPI, HTTPException, Request

    from rmserve.encoding import PairEncoder, ResponseTooLongError
    from rmserve.formatting import FormattingError, messages_from_pair, render, render_text
    from rmserve.manifest import TOKENIZER_NAME, load_bundle
    from rmserve.training.modeling import load_reward_model, reward_forward

    torch.set_num_threads(threads)
    manifest = load_bundle(bundle, verify_hashes=False)
    encoder = PairEncoder.from_file(str(bundle / TOKENIZER_NAME), manifest.max_length)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    model: Any = load_reward_model(str(checkpoint), pad_token_id=manifest.pad_token_id)
    model = model.to(device=device, dtype=torch_dtype).eval()
    pooling = manifest.architecture.pooling
    pad = manifest.pad_token_id

    def score(rendered: list[Any]) -> list[float]:
        encoded = encoder.encode_batch(rendered)
        longest = max(len(e.ids) for e in encoded)
        ids = torch.full((len(encoded), longest), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(encoded), longest), dtype=torch.long)  # (B, T)
        for row, e in enumerate(encoded):
            ids[row, : len(e.ids)] = torch.tensor(e.ids)
            mask[row, : len(e.ids)] = 1
        with torch.inference_mode():
            rewards = reward_forward(model, ids.to(device), mask.to(device), pooling)  # (B,)
        return [float(r) for r in rewards.float().cpu()]

    def render_item(item: Any) -> Any:
        if not isinstance(item, dict):
            raise FormattingError("each item must be an object")
        if "messages" in item:
            return render(item["messages"], manifest.text_format)
        if "text" in item:
            return render_text(str(item["text"]))
        return render(messages_from_pair(item["prompt"], item["response"]), manifest.text_format)

    app = FastAPI(title="naive-torch reward server (benchmark baseline)")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/v1/score")
    async def v1_score(request: Request) -> dict[str, Any]:
        body = await request.json()
        try:
            rendered = [render_item(item) for item in body["items"]]
            return {"scores": score(rendered)}
        except (FormattingError, KeyError, TypeError, ResponseTooLongError) as e:
            raise HTTPException(status_code=422, detail=str(e)) from e

    @app.post("/get_reward")
    async def get_reward(request: Request) -> dict[str, Any]:
        body = await request.json()
        try:
            rewards = score([render_text(str(q)) for q in body["query"]])
        except (KeyError, TypeError, ResponseTooLongError) as e:
            raise HTTPException(status_code=422, detail=str(e)) from e
        return {"rewards": rewards, "scores": rewards, "extra_logs": {}}

    # Warm up once so the first measured request does not pay for lazy initialisation.
    score([render_text("warm up")])
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--checkpoint", type=Path, required=True, help="transformers checkpoint")
    parser.add_argument("--bundle", type=Path, required=True, help="bundle (tokenizer, format)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8001, help="port to listen on")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads"
    )
    parser.add_argument(
        "--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weights' dtype"
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    args = parser.parse_args(argv)
    import uvicorn

    app = build_app(args.checkpoint, args.bundle, args.threads, args.dtype, args.device)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
