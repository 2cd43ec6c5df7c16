"""Model providers: ``local`` (offline, deterministic, the default) and ``openai`` (any compatible endpoint)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ModelProvider
from .local import LocalProvider
from .meter import Meter

if TYPE_CHECKING:
    from mesh.broker.breaker import Breakers
    from mesh.broker.settings import MeshSettings


def provider_for(settings: MeshSettings, breakers: Breakers | None = None, meter: Meter | None = None
                 ) -> ModelProvider:
    """The configured provider; a remote one calls its endpoint through ``breakers``; ``meter``
    counts every call's tokens (and holds jobs to their token budget)."""
    if settings.model_provider == "openai" or (settings.model_provider is None and settings.model_url):
        from .openai import OpenAIProvider

        return OpenAIProvider(settings, breakers=breakers, meter=meter)
    return LocalProvider(meter=meter)


__all__ = ["LocalProvider", "Meter", "ModelProvider", "provider_for"]
