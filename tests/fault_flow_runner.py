"""Run the real retrain flow in this process and stop at a named stage, so a test can SIGKILL it there.

    FAULT_STAGE=training|export|champion-switch|history|none FAULT_MARKER=/path \
        python -m tests.fault_flow_runner LINE DATA_DIR REGISTRY

The hooks wrap the real functions and only add a marker file (and, for the promotion stages, a pause at
the exact point where a crash is most delicate); everything else is the code that runs in production:

* ``training``: ``pipeline.train.train`` has started (marker ``training``; ``training-done`` after it returns)
* ``export``: ``pipeline.export.export_onnx`` has started (``export`` / ``export-done``)
* ``champion-switch``: the new ``CHAMPION`` temp file is written and fsynced, not yet renamed into place
* ``history``: ``CHAMPION`` was replaced, the history line not yet appended

Prints the flow's result as JSON when it gets to the end.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

TRAINED = {"img_size": 64, "feature_views": 1, "head_steps": 300, "finetune_epochs": 0, "batch_size": 8}
ALWAYS_PROMOTE = {"tolerance_balanced_accuracy": 1.0, "tolerance_defect_recall": 1.0,
                  "tolerance_false_reject_rate": None}


def _mark(marker: Path, text: str) -> None:
    with open(marker, "a") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


def install(stage: str, marker: Path) -> None:
    import pipeline.export
    import pipeline.registry
    import pipeline.train

    def around(module: Any, name: str, label: str) -> None:
        original = getattr(module, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            _mark(marker, label)
            out = original(*args, **kwargs)
            _mark(marker, f"{label}-done")
            return out

        setattr(module, name, wrapped)

    if stage == "training":
        around(pipeline.train, "train", "training")
    elif stage == "export":
        around(pipeline.export, "export_onnx", "export")
    elif stage == "champion-switch":
        write = pipeline.registry._write_durable

        def write_then_stop(path: Path, data: bytes) -> None:
            write(path, data)
            if Path(path).name.startswith(".CHAMPION.tmp"):
                _mark(marker, "champion-switch")
                time.sleep(600)

        pipeline.registry._write_durable = write_then_stop
    elif stage == "history":
        append = pipeline.registry.Registry._append_history

        def stop_then_append(self: Any, line: str, entry: Any) -> None:
            _mark(marker, "history")
            time.sleep(600)
            append(self, line, entry)

        pipeline.registry.Registry._append_history = stop_then_append
    elif stage != "none":
        raise SystemExit(f"unknown FAULT_STAGE {stage!r}")


def main() -> None:
    line, data, registry = sys.argv[1:4]
    install(os.environ.get("FAULT_STAGE", "none"), Path(os.environ.get("FAULT_MARKER", os.devnull)))
    from flows.retrain import retrain

    result = retrain(line, data, registry=registry, train_config=TRAINED, gate=ALWAYS_PROMOTE, reason="fault test",
                     lock_timeout_s=60)
    print(json.dumps({k: result[k] for k in ("version", "promoted", "champion_before")}), flush=True)


if __name__ == "__main__":
    main()
