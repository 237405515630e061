"""The retrain flow: snapshot -> fine-tune -> export with parity -> evaluate -> register -> gate -> promote.

Composes ``pipeline`` only. The whole run holds the line's lock, so two retrains of one line never
overlap (across processes and workers sharing the registry). Any failure before ``promote`` leaves the
champion untouched: the challenger is built in a scratch folder, registered as a new version, and the
CHAMPION pointer only moves after the gate says yes.

The gate set is the newest labelled data: a stratified, seeded share of ``data_dir`` held out from
training, on which challenger and champion are both evaluated with the same code.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.events import announce_promotion
from pipeline.data.folders import ImageFolder, guess_good_class, manifest_sha256, scan_image_folder, stratified_split
from pipeline.gate import GateConfig, GateDecision, decide
from pipeline.registry import Registry, line_lock
from pipeline.run import RunConfig, run_training
from pipeline.supervised_adapt import SupervisedAdaptConfig, adapt_supervised
from pipeline.train import CHECKPOINT_FILE, TrainConfig


def _transient_io_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition: an I/O error a second attempt can clear (EIO/ESTALE on a network share).

    Missing files, permissions, bad data and registry refusals fail the same way again, so they
    are not retried.
    """
    exc = state.result(raise_on_failure=False)
    permanent = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, TimeoutError)
    return isinstance(exc, OSError) and not isinstance(exc, permanent)


def remove_stale_scratch(line_folder: Path) -> list[str]:
    """Delete ``.run-*`` folders of earlier retrains that were killed (their ``finally`` never ran).

    Only a retrain holding the line lock creates one, and we hold it now, so any that exists is dead.
    """
    removed = []
    for p in sorted(line_folder.glob(".run-*")) if line_folder.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


@task(name="snapshot-data", retries=2, retry_delay_seconds=5, retry_condition_fn=_transient_io_error)
def snapshot_data(data_dir: str, gate_fraction: float, seed: int, classes: list[str] | None
                  ) -> tuple[ImageFolder, ImageFolder, str]:
    """Freeze what this run sees: (training pool, gate set, gate-set hash)."""
    ds = scan_image_folder(data_dir, classes=classes)
    pool, gate_set = stratified_split(ds, gate_fraction, seed=seed + 7919)
    return pool, gate_set, manifest_sha256(gate_set.manifest())


@task(name="fine-tune-and-export")
def train_challenger(data_dir: str, pool: ImageFolder, out_dir: str, good_class: str, shots: int | None,
                     target_frr: float, train_cfg: dict[str, Any], init_checkpoint: str | None,
                     adapt: dict[str, Any] | None = None, gate_files: list[str] | None = None,
                     masks_dir: str | None = None) -> dict:
    """Fine-tune, choose the threshold, export to ONNX and prove parity (no retries: deterministic).

    ``adapt`` (with ``init_checkpoint``): the supervised re-adaptation recipe
    (``pipeline.supervised_adapt``: replay of the champion's data, current-domain drift reference);
    ``gate_files`` are never trained on and join the pool as current-domain images for the reference.
    ``masks_dir``: defect pixel masks mirroring ``data_dir`` (``RunConfig.masks_dir``).
    """
    cfg = RunConfig(data_dir=Path(data_dir), out_dir=Path(out_dir), good_class=good_class, shots=shots,
                    target_frr=target_frr, masks_dir=Path(masks_dir) if masks_dir else None,
                    train=TrainConfig(**train_cfg))
    if adapt is not None and init_checkpoint:
        gate_paths = [Path(p) for p in gate_files or []]
        s, info = adapt_supervised(Path(init_checkpoint).parent, pool, cfg, SupervisedAdaptConfig(**adapt),
                                   exclude=gate_paths, domain_images=[x.path for x in pool.samples] + gate_paths)
        return {"onnx": str(s.onnx_path), "validation": s.metrics, "timings": s.timings, "parity": s.parity,
                "adaptation": info}
    s = run_training(cfg, dataset=pool, init_checkpoint=init_checkpoint)
    return {"onnx": str(s.onnx_path), "validation": s.metrics, "timings": s.timings, "parity": s.parity}


@task(name="evaluate-on-gate-set")
def evaluate_on(onnx_path: str, gate_set: ImageFolder, gate_hash: str) -> dict:
    from pipeline.evaluate import evaluate_model
    from pipeline.runtime import OnnxModel

    metrics, _ = evaluate_model(OnnxModel(onnx_path), gate_set)
    metrics["eval_set_sha256"] = gate_hash
    return metrics


@task(name="register", retries=1, retry_delay_seconds=2, retry_condition_fn=_transient_io_error)
def register(registry: str, line: str, run_dir: str, note: str) -> str:
    return Registry(Path(registry)).register(line, run_dir, note=note).version


def _artifact(line: str, version: str, decision: GateDecision, challenger: dict, champion: dict | None,
              champion_version: str | None, registry: str) -> None:
    rows = ["| metric | challenger | champion | delta |", "|---|---|---|---|"]
    for key in ("balanced_accuracy", "defect_recall_at_frr", "false_reject_rate", "n_images"):
        c = challenger.get(key)
        o = champion.get(key) if champion else None
        d = decision.deltas.get(key)
        rows.append(f"| {key} | {c} | {o if o is not None else '-'} | {'' if d is None else f'{d:+.4f}'} |")
    report = Path(registry) / line / version / "report.html"
    text = "\n".join([
        f"# Retrain `{line}`: {version} {'PROMOTED' if decision.promote else 'not promoted'}",
        f"Champion before: `{champion_version or 'none'}`", "", *rows, "",
        "**Gate:** " + "; ".join(decision.reasons), "", f"Report: `{report}`"])
    create_markdown_artifact(key=f"retrain-{line.lower().replace('_', '-').replace('.', '-')}", markdown=text,
                             description=f"gate decision for {line}/{version}")


@flow(name="retrain", log_prints=True)
def retrain(line: str, data_dir: str, registry: str = "models", shots: int | None = None, reason: str = "",
            good_class: str | None = None, gate_fraction: float = 0.3, target_frr: float = 0.02, seed: int = 0,
            warm_start: bool = False, train_config: dict[str, Any] | None = None,
            gate: dict[str, Any] | None = None, lock_timeout_s: float | None = 3600,
            supervised_adapt: dict[str, Any] | None = None, masks_dir: str | None = None) -> dict:
    """Retrain ``line`` on the labelled folder ``data_dir`` and promote the result if the gate allows.

    ``supervised_adapt`` (with ``warm_start``): re-adapt the champion with the recipe of
    ``pipeline.supervised_adapt.SupervisedAdaptConfig`` (``{}`` for its defaults: replay the champion's
    labelled data with the new images); None fine-tunes on ``data_dir`` alone. ``masks_dir``: pixel masks
    of the defect images, mirroring ``data_dir`` (optional; see ``pipeline.data.masks``).
    """
    logger = get_run_logger()
    # a misspelt recipe or gate field fails here, before the line is locked or anything trains
    cfg = {"seed": seed, **(train_config or {})}
    TrainConfig(**cfg)
    gate_cfg = GateConfig(**(gate or {}))
    if supervised_adapt is not None:
        SupervisedAdaptConfig(**supervised_adapt)
    reg = Registry(Path(registry))
    with line_lock(registry, line, timeout=lock_timeout_s) as lock:
        if stale := remove_stale_scratch(Path(registry) / line):
            logger.warning("removed the scratch of killed retrains of %s: %s", line, ", ".join(stale))
        champion = reg.champion(line)
        classes = champion.metadata().classes if champion else None
        pool, gate_set, gate_hash = snapshot_data(data_dir, gate_fraction, seed, classes)
        good = good_class or (champion.metadata().good_class if champion else guess_good_class(pool.classes))
        scratch = Path(registry) / line / f".run-{uuid.uuid4().hex[:12]}"
        try:
            init = str(champion.path / CHECKPOINT_FILE) if (warm_start and champion and
                                                            (champion.path / CHECKPOINT_FILE).is_file()) else None
            trained = train_challenger(data_dir, pool, str(scratch), good, shots, target_frr, cfg, init,
                                       adapt=supervised_adapt,
                                       gate_files=[str(s.path) for s in gate_set.samples], masks_dir=masks_dir)
            challenger_metrics = evaluate_on(trained["onnx"], gate_set, gate_hash)
            (scratch / "gate_metrics.json").write_text(json.dumps(challenger_metrics, indent=2))
            version = register(registry, line, str(scratch), reason or "retrain")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        champion_metrics = evaluate_on(str(champion.onnx_path), gate_set, gate_hash) if champion else None
        decision = decide(challenger_metrics, champion_metrics, gate_cfg)
        logger.info("gate for %s/%s: %s", line, version, decision.summary())
        if decision.promote:
            reg.promote(line, version, reason=f"{reason or 'retrain'}; {decision.summary()}", lock=lock)
            announce_promotion(line, version, previous=champion.version if champion else None, registry=registry,
                               reason=reason or "retrain", metrics=challenger_metrics)
        _artifact(line, version, decision, challenger_metrics, champion_metrics,
                  champion.version if champion else None, registry)
    return {"line": line, "version": version, "promoted": decision.promote, "reasons": decision.reasons,
            "champion_before": champion.version if champion else None,
            "challenger": {k: challenger_metrics.get(k) for k in ("balanced_accuracy", "defect_recall_at_frr",
                                                                   "false_reject_rate", "n_images")},
            "champion": None if champion_metrics is None else {
                k: champion_metrics.get(k) for k in ("balanced_accuracy", "defect_recall_at_frr",
                                                     "false_reject_rate", "n_images")},
            "timings": trained["timings"], "adaptation": trained.get("adaptation")}
