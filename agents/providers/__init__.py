"""Model providers: ``local`` (offline, deterministic, the default) and ``openai`` (any compatible endpoint)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ModelProvider
from .local import LocalProvider

if TYPE_CHECKING:
    from mesh.broker.breaker import Breakers
    from mesh.broker.settings import MeshSettings


def provider_for(settings: MeshSettings, breakers: Breakers | None = None) -> ModelProvider:
    """The configured provider; a remote one calls its endpoint through ``breakers``."""
    if settings.model_provider == "openai":
        from .openai import OpenAIProvider

        return OpenAIProvider(settings, breakers=breakers)
    return LocalProvider()


__all__ = ["LocalProvider", "ModelProvider", "provider_for"]
