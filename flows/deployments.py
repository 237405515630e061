"""Deployments of the retrain and re-adaptation flows, and the drift automation that runs the latter.

What :func:`apply_deployments` puts on a Prefect server (idempotent: run it again after a change):

* a ``process`` work pool (default ``defect-training``); training machines each run
  ``prefect worker start --pool defect-training``;
* ``retrain/on-demand``: no schedule; run by hand (``prefect deployment run retrain/on-demand
  -p line=... -p data_dir=...``) or by :func:`prefect.deployments.run_deployment`;
* ``retrain/weekly``: one cron schedule per line, each carrying that line's ``line`` and
  ``data_dir`` (``<data_root>/<line>``);
* ``readapt/on-drift`` (``flows.adapt.readapt``) with the drift automation as its trigger: every
  ``defect.drift.detected`` event of a resource ``defect.line.<line>`` runs it with ``line``,
  ``data_dir``, ``recent_dir`` and a ``reason`` rendered from the event (Jinja, evaluated by the
  server), and the site's ``registry``. ``readapt`` retrains (warm-started, gated) when ``data_dir``
  holds labelled images of the line's classes, and otherwise adapts the champion label-free on the
  daemon's recent images (``recent_dir``) and writes a labelling request.

The entry points are module paths (``flows.retrain.retrain``, ``flows.adapt.readapt``): workers import them from the installed
package, so nothing is built, pushed or pulled, and a worker runs whatever version of the package
is installed on its machine. Paths (registry, data) are made absolute here because a process worker
runs each flow in a temporary working directory; they must name the same storage on every
training machine (a shared mount).

The event contract, shared with the daemon (``pipeline.serve.drift.build_drift_event``; see also
:func:`drift_event`)::

    event     defect.drift.detected
    resource  {"prefect.resource.id": "defect.line.<line>", "line": <line>,
               optional "registry", "data_dir", "recent_dir" (strings)}
    payload   optional "registry", "data_dir", "recent_dir", "summary", plus anything else

Supervised re-adaptation needs *labelled* images (one folder per class). ``data_dir`` is taken from
the event (payload, then resource labels) when it names one, else it is ``<data_root>/<line>``: the
folder the site keeps labelled images of the line in, newest batches included. ``recent_dir`` (the
daemon's flat, unlabelled sample of recent images) is what label-free adaptation uses when there
are no labels; it also goes into the run's reason so whoever labels new images knows where to find them. The registry is always the site's
(``--registry`` at setup): a training machine may mount storage elsewhere than the daemon, and a
retrain into a folder no daemon follows would change nothing; when the event names a different
registry the reason says so.

Retries: the deployments have none. Training is deterministic, so a failed run repeats its
failure; the tasks that touch shared storage retry transient I/O errors themselves
(``flows.retrain``). Two retrains of one line never overlap: the flow holds the registry's line
lock for the whole run (a second one waits, up to ``lock_timeout_s``).

Prefect is imported inside the functions, so the daemon can import :func:`drift_event` without it.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.registry import validate_name

if TYPE_CHECKING:  # pragma: no cover
    from prefect.deployments.runner import RunnerDeployment
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

DRIFT_EVENT = "defect.drift.detected"
LINE_RESOURCE_PREFIX = "defect.line."
DEFAULT_WORK_POOL = "defect-training"
FLOW_NAME = "retrain"
ENTRYPOINT = "flows.retrain.retrain"
READAPT_FLOW_NAME = "readapt"
READAPT_ENTRYPOINT = "flows.adapt.readapt"
ON_DEMAND = "on-demand"
WEEKLY = "weekly"
ON_DRIFT = "on-drift"
DRIFT_TRIGGER_NAME = "defect-drift-readapt"
DEFAULT_CRON = "0 2 * * 0"  # Sundays 02:00: the line is usually down, the worker idle
TAGS = ("defect", "retrain")

# Parameters the deployments (or the automation) fill in per run; everything else of the flow's
# signature may be given a site-wide default.
_PER_RUN = frozenset({"line", "data_dir"})
# Characters that would break out of the quoted strings inside the automation's Jinja templates.
_UNSAFE_IN_TEMPLATE = set("'\"\\{}%#\n\r")


def line_resource_id(line: str) -> str:
    """``defect.line.<line>``: the resource id drift and promotion events of a line carry."""
    return LINE_RESOURCE_PREFIX + validate_name(line, "line")


def drift_event(line: str, *, registry: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None,
                recent_dir: str | os.PathLike | None = None, **details: Any) -> dict[str, Any]:
    """The ``defect.drift.detected`` event of ``line`` as plain JSON-able data.

    ``{"event", "resource", "payload"}``: pass them to ``prefect.events.emit_event(**...)``, or POST
    ``[{"id": uuid4, "occurred": now, **this}]`` to ``$PREFECT_API_URL/events`` from a host without
    Prefect installed. Paths go to both the resource labels (strings) and the payload.
    """
    resource = {"prefect.resource.id": line_resource_id(line), "prefect.resource.name": line, "line": line}
    payload: dict[str, Any] = {"line": line, **details}
    for key, value in (("registry", registry), ("data_dir", data_dir), ("recent_dir", recent_dir)):
        if value is not None:
            resource[key] = payload[key] = str(value)
    return {"event": DRIFT_EVENT, "resource": resource, "payload": payload}


def emit_drift_event(line: str, *, registry: str | os.PathLike | None = None,
                     data_dir: str | os.PathLike | None = None, recent_dir: str | os.PathLike | None = None,
                     **details: Any) -> str:
    """Send a drift event to the Prefect API of the current settings (``PREFECT_API_URL``); its id.

    Posted synchronously to ``/events``, so an unreachable or refusing server raises here instead
    of the event being dropped in a background queue (``prefect.events.emit_event`` only logs that)
    and the URL is the one of the calling context, even inside a test harness.
    """
    from prefect import get_client
    from prefect.events import Event

    event = Event(**drift_event(line, registry=registry, data_dir=data_dir, recent_dir=recent_dir, **details))
    with get_client(sync_client=True) as client:
        client.request("POST", "/events", json=[event.model_dump(mode="json")])
    return str(event.id)


class DeploymentSettings(BaseModel):
    """What a site chooses when it deploys the retrain flow."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent default

    work_pool: str = Field(DEFAULT_WORK_POOL, min_length=1)
    registry: Path = Path("models")
    # <data_root>/<line> is the labelled folder a line is retrained on (weekly, and on drift when
    # the event names no data_dir); required for the drift trigger and for weekly schedules.
    data_root: Path | None = None
    # Lines that get a weekly schedule (each needs data_root/<line>).
    lines: list[str] = Field(default_factory=list)
    cron: str = DEFAULT_CRON
    timezone: str = "UTC"
    # Runs the pool hands out at once, over all its workers (None: unbounded; bound CPU per machine
    # with ``prefect worker start --limit N``).
    pool_concurrency: int | None = Field(None, ge=1)
    # Site-wide defaults for the flows' other parameters: train_config, gate, target_frr, shots, label_free, ...
    # (each deployment gets those its flow takes).
    defaults: dict[str, Any] = Field(default_factory=dict)
    drift_trigger: bool = True

    @field_validator("lines")
    @classmethod
    def _valid_lines(cls, v: list[str]) -> list[str]:
        return [validate_name(x, "line") for x in dict.fromkeys(v)]

    @field_validator("defaults")
    @classmethod
    def _known_parameters(cls, v: dict[str, Any]) -> dict[str, Any]:
        allowed = (_flow_parameters("retrain") | _flow_parameters("readapt")) - _PER_RUN - {"registry", "recent_dir"}
        unknown = sorted(set(v) - allowed)
        if unknown:
            raise ValueError(f"unknown flow parameters {unknown}; allowed: {sorted(allowed)} "
                             "(line and data_dir are set per run, registry by the registry setting)")
        return v

    @model_validator(mode="after")
    def _valid_schedule(self) -> DeploymentSettings:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=self.cron, timezone=self.timezone)
        except ValueError as e:  # pydantic's message names the field; keep just what was wrong
            raise ValueError(f"invalid schedule {self.cron!r} ({self.timezone}): "
                             f"{' '.join(str(e).split())}") from None
        if self.data_root is None and (self.lines or self.drift_trigger):
            raise ValueError("a data root is needed: <data_root>/<line> is the labelled folder a line retrains "
                             "on, weekly and on drift (or pass no lines and disable the drift trigger)")
        return self


def _flow_parameters(name: str) -> set[str]:
    """Parameter names of the ``retrain`` or ``readapt`` flow."""
    if name == "retrain":
        from flows.retrain import retrain as fl
    else:
        from flows.adapt import readapt as fl
    return set(inspect.signature(fl.fn).parameters)


class SetupResult(BaseModel):
    """What :func:`apply_deployments` created or updated."""

    api_url: str | None
    work_pool: str
    work_pool_created: bool
    deployments: dict[str, UUID]  # "retrain/on-demand" -> id
    automation_ids: list[UUID]
    scheduled_lines: list[str]
    registry: str
    data_root: str | None


def _template_safe(path: Path, what: str) -> str:
    text = str(path)
    bad = sorted(set(text) & _UNSAFE_IN_TEMPLATE)
    if bad:
        raise ValueError(f"{what} {text!r} contains {''.join(bad)!r}: not usable inside the automation's templates")
    return text


def _absolute(settings: DeploymentSettings) -> DeploymentSettings:
    return settings.model_copy(update={
        "registry": settings.registry.expanduser().absolute(),
        "data_root": None if settings.data_root is None else settings.data_root.expanduser().absolute()})


def drift_trigger_parameters(settings: DeploymentSettings) -> dict[str, str]:
    """The RunDeployment parameters of the drift automation: Jinja templates over the event."""
    s = _absolute(settings)
    if s.data_root is None:
        raise ValueError("the drift automation needs a data root: <data_root>/<line> is what a line "
                         "retrains on when the event names no labelled data_dir (or disable the trigger)")
    registry = _template_safe(s.registry, "registry")
    data_root = _template_safe(s.data_root, "data root")
    line = f"(event.resource.get('line') or event.resource.id[{len(LINE_RESOURCE_PREFIX)}:])"
    event_registry = "(event.payload.get('registry') or event.resource.get('registry'))"
    recent = "(event.payload.get('recent_dir') or event.resource.get('recent_dir'))"
    return {
        "recent_dir": "{{ " + recent + " }}",
        # Whole expressions in parentheses: the server appends "| tojson", which binds tighter than "or".
        "line": "{{ " + line + " }}",
        "data_dir": ("{{ (event.payload.get('data_dir') or event.resource.get('data_dir') or "
                     f"'{data_root}/' ~ {line}) }}}}"),
        "registry": registry,
        "reason": ("drift alarm on {{ " + line + " }} at {{ event.occurred }} (event {{ event.id }})"
                   "{% if event.payload.get('summary') %}: {{ event.payload.get('summary') }}{% endif %}"
                   "{% if " + recent + " %}; recent images: {{ " + recent + " }}{% endif %}"
                   "{% if " + event_registry + " and " + event_registry + f" != '{registry}' %}}"
                   "; the daemon serves from {{ " + event_registry + " }}, retrained into "
                   f"{registry}{{% endif %}}"),
    }


def drift_trigger(settings: DeploymentSettings) -> DeploymentEventTrigger:
    """On each ``defect.drift.detected`` of any ``defect.line.*`` resource, run the deployment once."""
    from datetime import timedelta

    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=DRIFT_TRIGGER_NAME,
        description="Re-adapt a line when its inspection daemon reports drift (event defect.drift.detected).",
        expect={DRIFT_EVENT},
        match={"prefect.resource.id": LINE_RESOURCE_PREFIX + "*"},
        for_each={"prefect.resource.id"},  # lines are counted separately
        posture="Reactive", threshold=1, within=timedelta(0),
        parameters=drift_trigger_parameters(settings))


def build_deployments(settings: DeploymentSettings) -> list[RunnerDeployment]:
    """The three deployments, not yet applied: ``retrain/on-demand``, ``retrain/weekly`` and
    ``readapt/on-drift`` (with the drift trigger).

    The weekly schedules are not part of them: :func:`apply_deployments` reconciles those itself,
    because updating a deployment does not replace schedules it already has.
    """
    from prefect.deployments.runner import EntrypointType

    from flows.adapt import readapt
    from flows.retrain import retrain

    s = _absolute(settings)
    if s.lines and s.data_root is None:
        raise ValueError("weekly schedules need a data root: each line retrains on <data_root>/<line>")

    def common(flow_name: str) -> dict[str, Any]:
        accepted = _flow_parameters(flow_name)
        params = {k: v for k, v in s.defaults.items() if k in accepted}
        return dict(work_pool_name=s.work_pool, entrypoint_type=EntrypointType.MODULE_PATH, tags=list(TAGS),
                    parameters={**params, "registry": str(s.registry)})

    on_demand = retrain.to_deployment(
        ON_DEMAND, description="Retrain one line now (by hand or run_deployment).", **common(FLOW_NAME))
    weekly = retrain.to_deployment(
        WEEKLY, description="Scheduled retrain of every line listed at setup, one cron schedule per line.",
        **common(FLOW_NAME))
    on_drift = readapt.to_deployment(
        ON_DRIFT, description="Re-adapt a line after a drift alarm: supervised with labelled current-domain "
                              "images, else label-free on the daemon's recent images (the drift automation).",
        triggers=[drift_trigger(s)] if s.drift_trigger else [], **common(READAPT_FLOW_NAME))
    return [on_demand, weekly, on_drift]


def weekly_schedules(settings: DeploymentSettings) -> dict[str, dict[str, Any]]:
    """slug -> {cron, timezone, parameters} of the weekly deployment: one schedule per line."""
    s = _absolute(settings)
    if s.lines and s.data_root is None:
        raise ValueError("weekly schedules need a data root: each line retrains on <data_root>/<line>")
    return {f"weekly-{line}": {"cron": s.cron, "timezone": s.timezone,
                               "parameters": {"line": line, "data_dir": str(s.data_root / line),
                                              "reason": f"weekly scheduled retrain ({s.cron} {s.timezone})"}}
            for line in s.lines}


def _reconcile_schedules(client: Any, deployment_id: UUID, wanted: dict[str, dict[str, Any]]) -> None:
    """Make the deployment's schedules exactly ``wanted`` (by slug); unchanged ones are kept."""
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule

    keep = set()
    for existing in client.read_deployment_schedules(deployment_id):
        want = wanted.get(existing.slug or "")
        sched = existing.schedule
        same = (want is not None and existing.slug not in keep and isinstance(sched, CronSchedule)
                and sched.cron == want["cron"] and sched.timezone == want["timezone"]
                and existing.parameters == want["parameters"] and existing.active)
        if same:
            keep.add(existing.slug)
        else:
            client.delete_deployment_schedule(deployment_id, existing.id)
    missing = [DeploymentScheduleCreate(schedule=CronSchedule(cron=w["cron"], timezone=w["timezone"]), active=True,
                                        parameters=w["parameters"], slug=slug)
               for slug, w in wanted.items() if slug not in keep]
    if missing:
        client.create_deployment_schedules(deployment_id, missing)


def ensure_work_pool(name: str, concurrency: int | None = None) -> bool:
    """Create the ``process`` pool if missing (True), else set its concurrency limit when given (False)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process", concurrency_limit=concurrency,
                base_job_template=ProcessWorker.get_default_base_job_template(),
                description="Training machines of the defect pipeline (prefect worker start --pool ...)"))
            return True
        if pool.type != "process":
            raise ValueError(f"work pool {name!r} exists with type {pool.type!r}; the retrain flow needs a "
                             "'process' pool (choose another --work-pool name)")
        if concurrency is not None and pool.concurrency_limit != concurrency:
            client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=concurrency))
        return False


def apply_deployments(settings: DeploymentSettings) -> SetupResult:
    """Create or update the work pool, both deployments and the drift automation on the current API."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    s = _absolute(settings)
    deployments = build_deployments(s)  # validate everything before touching the server
    schedules = weekly_schedules(s)
    created = ensure_work_pool(s.work_pool, s.pool_concurrency)
    ids = {f"{d.flow_name}/{d.name}": d.apply() for d in deployments}
    with get_client(sync_client=True) as client:
        _reconcile_schedules(client, ids[f"{FLOW_NAME}/{WEEKLY}"], schedules)
        automations = client.read_resource_related_automations(
            f"prefect.deployment.{ids[f'{READAPT_FLOW_NAME}/{ON_DRIFT}']}")
    return SetupResult(api_url=PREFECT_API_URL.value(), work_pool=s.work_pool, work_pool_created=created,
                       deployments=ids, automation_ids=[a.id for a in automations if a.name == DRIFT_TRIGGER_NAME],
                       scheduled_lines=list(s.lines), registry=str(s.registry),
                       data_root=None if s.data_root is None else str(s.data_root))
