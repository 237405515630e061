"""Re-adaptation after drift: supervised when labelled new-domain images exist, label-free otherwise.

``readapt`` is what the drift automation runs. With a labelled folder it is the gated ``retrain``,
warm-started from the champion and replaying its labelled data with the new images
(``pipeline.supervised_adapt``: the new images alone made a model worse than the champion). With only the daemon's recent (unlabelled) images it AdaBN-adapts the champion, judges
the candidate by the label-free checks (``pipeline.adapt.label_free_checks``), promotes it only if
all pass, and always writes a labelling request so the next round can be supervised.
"""

from __future__ import annotations

import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.events import announce_promotion
from pipeline.adapt import LabelFreeConfig, adapt_label_free
from pipeline.data.folders import scan_image_folder
from pipeline.registry import NoChampionError, Registry, line_lock


def _has_labels(folder: str | None, classes: list[str] | None) -> bool:
    """At least two of ``classes`` (or of the folder's own classes) have two or more images."""
    if not folder or not Path(folder).is_dir():
        return False
    try:
        ds = scan_image_folder(folder, classes=classes)
    except ValueError:
        return False
    counts = ds.counts()
    return sum(1 for c in (classes or ds.classes) if counts.get(c, 0) >= 2) >= 2


@task(name="label-free-adapt")
def label_free_candidate(champion_dir: str, recent_dir: str, out_dir: str, labelling_dir: str,
                         cfg: dict[str, Any]) -> dict:
    r = adapt_label_free(Path(champion_dir), Path(recent_dir), Path(out_dir), LabelFreeConfig(**cfg),
                         labelling_dir=Path(labelling_dir))
    return {"checks": r.checks, "passed": r.passed, "timings": r.timings,
            "labelling_request": str(r.labelling_request) if r.labelling_request else None}


@flow(name="readapt", log_prints=True)
def readapt(line: str, registry: str = "models", data_dir: str | None = None, recent_dir: str | None = None,
            reason: str = "drift", label_free: dict[str, Any] | None = None, train_config: dict[str, Any] | None = None,
            shots: int | None = None, seed: int = 0, lock_timeout_s: float | None = 3600,
            gate: dict[str, Any] | None = None, supervised_adapt: dict[str, Any] | None = None) -> dict:
    """Adapt ``line`` to its current domain; labelled ``data_dir`` wins over unlabelled ``recent_dir``.

    Labelled: warm start from the champion with ``supervised_adapt`` (``SupervisedAdaptConfig`` fields;
    default: replay the champion's labelled data alongside the new images, see ``pipeline.supervised_adapt``).

    With labels and no champion yet (a new line whose first alarm came before its first model) it
    trains the first model, like ``retrain``; without labels there is nothing to start from.
    """
    from flows.retrain import retrain

    logger = get_run_logger()
    reg = Registry(Path(registry))
    champion = reg.champion(line)
    if _has_labels(data_dir, champion.metadata().classes if champion else None):
        logger.info("labelled current-domain data in %s: supervised retrain", data_dir)
        out = retrain(line=line, data_dir=data_dir, registry=registry, reason=reason, warm_start=champion is not None,
                      train_config=train_config, shots=shots, seed=seed, lock_timeout_s=lock_timeout_s, gate=gate,
                      supervised_adapt={"seed": seed, **(supervised_adapt or {})})
        return {**out, "mode": "supervised"}
    if champion is None:
        raise NoChampionError(f"line {line!r} has no champion to adapt and {data_dir or 'no data_dir'} holds no "
                              "labelled images to train one from")
    if not recent_dir:
        raise ValueError("no labelled data_dir and no recent_dir of new-domain images: nothing to adapt on")
    logger.info("no labels: label-free adaptation on %s", recent_dir)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    with line_lock(registry, line, timeout=lock_timeout_s) as lock:
        champion = reg.champion(line)  # may have changed while we waited for the lock
        scratch = Path(registry) / line / f".run-{uuid.uuid4().hex[:12]}"
        labelling = Path(registry) / line / "labelling" / stamp
        try:
            cand = label_free_candidate(str(champion.path), recent_dir, str(scratch), str(labelling),
                                        label_free or {})
            version = reg.register(line, scratch, note=f"label-free AdaBN: {reason}").version
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        checks = cand["checks"]
        summary = ", ".join(f"{k}={v}" for k, v in checks.items() if k.endswith("_ok"))
        if cand["passed"]:
            reg.promote(line, version, reason=f"{reason}; label-free checks passed ({summary})", lock=lock)
            announce_promotion(line, version, previous=champion.version, registry=registry,
                               reason=f"label-free: {reason}")
        logger.info("label-free candidate %s/%s: %s (%s)", line, version,
                    "promoted" if cand["passed"] else "not promoted", summary)
    return {"line": line, "version": version, "promoted": cand["passed"], "mode": "label_free",
            "checks": checks, "champion_before": champion.version, "labelling_request": cand["labelling_request"],
            "timings": cand["timings"]}
