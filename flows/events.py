"""Prefect events the flows emit, so automations, the UI and notifications see what the loop did.

``defect.model.promoted`` (resource ``defect.line.<line>``) follows every champion change a flow
makes. Daemons do not need it (they follow the registry's CHAMPION file); people and other
automations do, e.g. "tell the line's shift lead when a new model goes live".
"""

from __future__ import annotations

import logging
from typing import Any

from flows.deployments import line_resource_id

log = logging.getLogger(__name__)

PROMOTED_EVENT = "defect.model.promoted"


def promotion_event(line: str, version: str, *, previous: str | None, registry: str, reason: str,
                    metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"event", "resource", "payload"}`` of a promotion, for ``prefect.events.emit_event(**...)``."""
    resource = {"prefect.resource.id": line_resource_id(line), "prefect.resource.name": line, "line": line,
                "registry": str(registry), "defect.model_version": version}
    payload = {"line": line, "version": version, "previous": previous, "registry": str(registry), "reason": reason,
               "metrics": {k: v for k, v in (metrics or {}).items()
                           if k in ("balanced_accuracy", "defect_recall_at_frr", "false_reject_rate", "n_images")}}
    return {"event": PROMOTED_EVENT, "resource": resource, "payload": payload}


def announce_promotion(line: str, version: str, *, previous: str | None, registry: str, reason: str,
                       metrics: dict[str, Any] | None = None) -> str | None:
    """Emit ``defect.model.promoted``; returns the event id, or None when it could not be emitted.

    Never raises: the promotion has already happened, and a lost notification must not turn a
    successful flow run into a failed one (it is logged instead).
    """
    try:
        from prefect.events import emit_event

        event = emit_event(**promotion_event(line, version, previous=previous, registry=registry, reason=reason,
                                             metrics=metrics))
    except Exception as exc:
        log.warning("could not emit %s for %s/%s: %s: %s", PROMOTED_EVENT, line, version, type(exc).__name__, exc)
        return None
    return None if event is None else str(event.id)
