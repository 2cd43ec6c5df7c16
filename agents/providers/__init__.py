"""Model providers: ``local`` (offline, deterministic, the default) and ``openai`` (any compatible endpoint)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ModelProvider
from .local import LocalProvider

if TYPE_CHECKING:
    from broker.settings import MeshSettings


def provider_for(settings: MeshSettings) -> ModelProvider:
    if settings.model_provider == "openai":
        from .openai import OpenAIProvider

        return OpenAIProvider(settings)
    return LocalProvider()


__all__ = ["LocalProvider", "ModelProvider", "provider_for"]
