"""Prometheus metrics for one daemon, on its own ``CollectorRegistry`` (no process-global state).

All names carry the ``defect_`` prefix. Label sets are small and bounded (decision, source kind, error
kind, refusal reason) so the series count cannot grow with traffic.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """The daemon's metrics; ``render()`` gives the Prometheus text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.images = Counter("defect_images", "Images with a committed result, by decision (good/defect/error) "
                              "and source kind", ["decision", "source"], registry=r)
        self.errors = Counter("defect_errors", "Images that could not be scored, by error kind", ["kind"],
                              registry=r)
        self.latency = Histogram("defect_latency_seconds", "Accepted -> scored time per image",
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("defect_inference_seconds", "ONNX Runtime time per batch",
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("defect_batch_size", "Images per model batch", buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.queue_depth = Gauge("defect_queue_depth", "Images accepted but not yet committed", registry=r)
        self.model_info = Gauge("defect_model_info", "The model serving now (value 1)",
                                ["version", "sha256", "provider"], registry=r)
        self.swaps = Counter("defect_model_swaps", "Hot-swaps to a new model", registry=r)
        self.refusals = Counter("defect_model_refusals", "New models refused (old one kept serving), by reason",
                                ["reason"], registry=r)
        self.observer_errors = Counter("defect_observer_errors", "Exceptions raised by batch observers", registry=r)
        self.observer_dropped = Counter("defect_observer_dropped", "Batches not given to observers "
                                        "because they were too slow", registry=r)
        self.store_failures = Counter("defect_store_failures", "Failed result commits (retried)", registry=r)
        self.camera_reconnects = Counter("defect_camera_reconnects", "Camera stream (re)connection attempts "
                                         "after a failure", registry=r)
        self.camera_skipped = Counter("defect_camera_frames_skipped", "Sampled live frames skipped because "
                                      "the queue was full", registry=r)
        self.move_failures = Counter("defect_folder_move_failures", "Hot-folder files whose move after "
                                     "commit failed (retried)", registry=r)
        self.rejected = Counter("defect_rejected", "Requests refused before scoring, by reason", ["reason"],
                                registry=r)
        # Drift monitoring (pipeline.serve.drift); labelled by detector, a fixed set of eight.
        self.drift_score = Gauge("defect_drift_score", "Latest drift score of the current model's monitor",
                                 ["detector"], registry=r)
        self.drift_threshold = Gauge("defect_drift_threshold", "Calibrated alarm threshold of each drift "
                                     "detector", ["detector"], registry=r)
        self.drift_alarm = Gauge("defect_drift_alarm", "1 while the deciding drift detector is in an alarm "
                                 "episode", ["detector"], registry=r)
        self.drift_episodes = Counter("defect_drift_episodes", "Drift alarm episodes started", ["detector"],
                                      registry=r)
        self.drift_images = Counter("defect_drift_images", "Scored images fed to the drift monitor", registry=r)
        self.drift_prefect_events = Counter("defect_drift_prefect_events", "defect.drift.detected events, by "
                                            "outcome (sent, failed, suppressed, off, dropped)", ["outcome"],
                                            registry=r)
        self.recent_saved = Counter("defect_recent_saved", "Images written to the recent-image sample", registry=r)
        self.recent_dropped = Counter("defect_recent_dropped", "Recent-sample images not written (writer "
                                      "busy or failed)", registry=r)
        self.recent_files = Gauge("defect_recent_files", "Images in the recent-image sample", registry=r)
        self.recent_bytes = Gauge("defect_recent_bytes", "Bytes in the recent-image sample", registry=r)
        self._model_labels: tuple[str, str, str] | None = None
        self._lock = threading.Lock()

    def set_model(self, version: str, sha256: str, provider: str) -> None:
        """Point the info gauge at the model now serving (the old label set is removed)."""
        with self._lock:
            if self._model_labels is not None:
                try:
                    self.model_info.remove(*self._model_labels)
                except KeyError:
                    pass
            self._model_labels = (version, sha256[:12], provider)
            self.model_info.labels(*self._model_labels).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
