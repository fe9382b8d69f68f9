"""The four services by name, as `conduit run SERVICE` and `conduit up` start them.

This is the one place that imports services: services never import each other, and ``shared``
never imports a service.
"""
from __future__ import annotations

from importlib import import_module
from typing import Callable

from shared.lifecycle import Service
from shared.settings import Settings

SERVICE_FACTORIES = {
    "ingest": "services.ingest.service:IngestService",
    "evaluate": "services.evaluate.service:EvaluateService",
    "dispatch": "services.dispatch.service:DispatchService",
    "exchange_sync": "services.exchange_sync.service:ExchangeSyncService",
}


def rule_chains() -> dict[str, list[tuple[str, str, tuple[str, ...]]]]:
    """Each tracking option's rule chain, in order: (rule name, description, reason codes)."""
    from services.evaluate.chains import CHAINS

    return {option: [(r.name, r.description, r.reasons) for r in chain.rules] for option, chain in CHAINS.items()}


def build_service(name: str, settings: Settings) -> Service:
    module_name, _, attr = SERVICE_FACTORIES[name].partition(":")
    factory: Callable[[Settings], Service] = getattr(import_module(module_name), attr)
    return factory(settings)
