"""Air-gapped defaults: Prefect's analytics and telemetry heartbeats are off unless the site says otherwise.

Plants run without internet; with analytics on, a temporary Prefect server (a ``defect adapt`` or the demo
without ``PREFECT_API_URL``) logs telemetry tracebacks and takes database locks for nothing. Explicit
settings in the environment always win.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

OFFLINE_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def apply_offline_defaults(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set each of ``OFFLINE_ENV`` that ``environ`` does not already set (call before Prefect starts a server)."""
    for key, value in OFFLINE_ENV.items():
        environ.setdefault(key, value)
