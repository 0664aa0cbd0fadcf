"""``rmserve serve BUNDLE``: every :class:`ServiceSettings` field is also a flag.

Flags are generated from the settings fields (``max_wait_ms`` -> ``--max-wait-ms``) with the
fields' descriptions as help, so the two can never drift apart. A flag given on the command
line wins over its ``RMSERVE_*`` variable; one not given leaves the variable or the default.
Only pydantic is imported to build the parser; uvicorn, FastAPI and onnxruntime are imported
when the command runs.
"""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Any

__all__ = ["register", "run_serve"]


def _flag_kwargs(annotation: Any) -> dict[str, Any]:
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": list(typing.get_args(annotation))}
    if annotation in (int, float):
        return {"type": annotation}
    return {"type": str}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from rmserve.service.settings import ServiceSettings

    parser = subparsers.add_parser(
        "serve",
        help="serve a bundle over HTTP (FastAPI + ONNX Runtime, dynamic batching)",
        description=(
            "Serve a bundle's reward model over HTTP: /v1/score, /v1/rank, /v1/compare, "
            "/get_reward (OpenRLHF), /classify (vLLM/verl), /slime/reward (slime), /v1/models, "
            "/healthz, /readyz, "
            "/metrics; OpenAPI docs at /docs. Every flag is also an environment variable "
            "RMSERVE_<NAME>; the flag wins."
        ),
    )
    parser.add_argument(
        "bundle",
        nargs="?",
        default=None,
        help="bundle directory (made by `rmserve export`); default: $RMSERVE_BUNDLE",
    )
    for name, field in ServiceSettings.model_fields.items():
        if name == "bundle":
            continue
        default = field.default
        shown = "empty" if default in ("", None) else default
        help_text = f"{field.description} (env RMSERVE_{name.upper()}; default: {shown})"
        if name == "api_keys":
            # Command lines are world-readable (ps, /proc/PID/cmdline); the environment is not.
            help_text = (
                f"{field.description} Prefer the RMSERVE_API_KEYS variable (or a Kubernetes "
                "Secret): keys given as this flag show in process listings (ps). (default: empty)"
            )
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            help=help_text,
            **_flag_kwargs(field.annotation),
        )
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from rmserve.service.settings import ServiceSettings

    overrides = {
        name: getattr(args, name)
        for name in ServiceSettings.model_fields
        if getattr(args, name, None) is not None
    }
    try:
        settings = ServiceSettings(**overrides)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in e.errors()
        )
        print(f"rmserve serve: invalid settings: {problems}", file=sys.stderr)
        return 2
    if settings.bundle is None:
        print(
            "rmserve serve: no bundle given; pass BUNDLE or set RMSERVE_BUNDLE "
            "(make one with `rmserve export`)",
            file=sys.stderr,
        )
        return 2

    from rmserve.service.server import serve

    return serve(settings)
