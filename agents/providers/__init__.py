"""Model providers: ``local`` (offline, deterministic, the default), ``openai`` (any compatible endpoint,
over httpx), and on the vendors' SDKs ``openai_sdk`` and ``anthropic`` (the extras of the same names)."""

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
    if settings.model_provider == "openai_sdk":
        from .openai_sdk import OpenAISDKProvider

        return OpenAISDKProvider(settings, breakers=breakers, meter=meter)
    if settings.model_provider == "anthropic":
        from .anthropic_sdk import AnthropicProvider

        return AnthropicProvider(settings, breakers=breakers, meter=meter)
    if settings.model_provider == "openai" or (settings.model_provider is None and settings.model_url):
        from .openai import OpenAIProvider

        return OpenAIProvider(settings, breakers=breakers, meter=meter)
    return LocalProvider(meter=meter)


__all__ = ["LocalProvider", "Meter", "ModelProvider", "provider_for"]
