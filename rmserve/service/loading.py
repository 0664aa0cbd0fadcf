"""Loading a bundle for serving: the manifest checked, the ONNX Runtime session and the request
tokenizer made, as one :class:`LoadedModel` (the request pipeline is
:mod:`rmserve.service.pipeline`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rmserve.manifest import Manifest, load_bundle
from rmserve.service.runtime import ModelRuntime
from rmserve.service.settings import ServiceSettings
from rmserve.service.tokenization import RequestTokenizer

__all__ = ["LoadedModel", "check_bundle", "load_model"]


@dataclass
class LoadedModel:
    """A checked bundle with its ORT session and tokenizer, ready to serve."""

    bundle_dir: Path
    manifest: Manifest
    runtime: ModelRuntime
    tokenizer: RequestTokenizer

    @property
    def max_length(self) -> int:
        """Tokens per item in force: the bundle's max_length or RMSERVE_MAX_LENGTH below it."""
        return self.tokenizer.max_length

    def close(self) -> None:
        self.tokenizer.close()


def check_bundle(settings: ServiceSettings) -> Manifest:
    """Check the bundle of ``settings`` (manifest, file hashes, fit with the settings) without
    loading the model; raises BundleError or ValueError naming the problem."""
    if settings.bundle is None:
        raise ValueError("no bundle given: pass BUNDLE to `rmserve serve` or set RMSERVE_BUNDLE")
    manifest = load_bundle(settings.bundle)
    settings.batch_token_budget(settings.item_max_length(manifest.max_length))
    return manifest


def load_model(settings: ServiceSettings, manifest: Manifest | None = None) -> LoadedModel:
    """Load the bundle of ``settings`` (checked first unless ``manifest`` says it was);
    raises BundleError, RuntimeConfigError or ValueError."""
    if manifest is None:
        manifest = check_bundle(settings)
    assert settings.bundle is not None  # check_bundle refused a missing one
    runtime = ModelRuntime(
        settings.bundle,
        manifest,
        precision=settings.precision,
        provider=settings.provider,
        intra_op_threads=settings.intra_op_threads,
        instances=settings.model_instances,
        prefix_reuse=settings.prefix_reuse,
    )
    tokenizer = RequestTokenizer(
        settings.bundle,
        manifest,
        max_item_chars=settings.max_item_chars,
        threads=settings.tokenizer_threads,
        max_length=settings.item_max_length(manifest.max_length),
    )
    return LoadedModel(settings.bundle, manifest, runtime, tokenizer)
