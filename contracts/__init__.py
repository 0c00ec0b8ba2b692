"""The published language between the services: every event one service publishes and another
reads, and the vocabulary those events carry (groups, sexes, Lee grades, deviation codes, the
LOINC catalogue).

Dependencies run one way: services import ``contracts`` and the project's ``shared``; no service
imports another service, and ``shared`` imports neither. A service makes the events it decodes
known to its registry explicitly, at its composition root (``register_all``, then its own private
events), rather than as a side effect of importing a module.
"""

from __future__ import annotations

from contracts import cells, deviations, enrollment, labs, pulse
from shared.events import DomainEvent, EventRegistry

CONTRACT_EVENTS: tuple[type[DomainEvent], ...] = (
    *enrollment.EVENTS,
    *pulse.EVENTS,
    *cells.EVENTS,
    *deviations.EVENTS,
    *labs.EVENTS,
)
"""Every published event type, by the service that publishes it (deviations: pulse and cells)."""


def register_all(registry: EventRegistry, *private: type[DomainEvent]) -> EventRegistry:
    """Register every contract event, and a service's own ``private`` events, in ``registry``."""
    for model in (*CONTRACT_EVENTS, *private):
        registry.register(model)
    return registry
