"""Serving a model artefact with ONNX Runtime. Never imports torch.

Providers are tried in the order TensorRT -> CUDA -> CPU, keeping only those that the
installed build offers *and* that actually initialise for this model (a CUDA build on a
host without a driver silently falls back to CPU; we report what really runs).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field

from pipeline.metadata import INPUT_NAME, OUTPUT_EMBEDDING, OUTPUT_PROBS, ModelMetadata, load_metadata
from pipeline.preprocess import preprocess

log = logging.getLogger(__name__)

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_GRAPH_OPT = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ModelIntegrityError(RuntimeError):
    """The model file does not match the sha256 its metadata promises."""


class RuntimeOptions(BaseModel):
    """How to run a model; defaults suit a small CPU inference host."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent default

    providers: list[str] | None = None  # None: best available in PREFERRED_PROVIDERS order
    intra_op_threads: int = Field(0, ge=0)  # 0: ONNX Runtime's default (one per physical core)
    inter_op_threads: int = Field(1, ge=0)
    graph_optimization: str = Field("all", pattern="^(disable|basic|extended|all)$")
    verify_sha256: bool = True
    max_batch: int = Field(32, ge=1)
    # Off saves ~40 MB with Lite0 on a daemon whose batch size varies (ORT's memory-pattern planner
    # keeps an arena per input shape).
    enable_mem_pattern: bool = True
    # Idle ORT threads spin by default and steal CPU from decode threads in a daemon.
    allow_spinning: bool = True


@dataclass(frozen=True)
class Prediction:
    label: str
    probabilities: dict[str, float]
    defect_score: float
    decision: str  # "good" or "defect"

    def as_dict(self) -> dict:
        return {"class": self.label, "probabilities": self.probabilities,
                "defect_score": self.defect_score, "decision": self.decision}


def candidate_providers(requested: list[str] | None = None) -> list[str]:
    """Providers this ONNX Runtime build offers, in preference order."""
    available = set(ort.get_available_providers())
    wanted = requested or list(PREFERRED_PROVIDERS)
    out = [p for p in wanted if p in available]
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return out


def create_session(model: bytes | str, options: RuntimeOptions) -> ort.InferenceSession:
    """An InferenceSession on the best provider that really initialises, falling back one by one."""
    so = ort.SessionOptions()
    so.graph_optimization_level = _GRAPH_OPT[options.graph_optimization]
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.log_severity_level = 3
    so.enable_mem_pattern = options.enable_mem_pattern
    if not options.allow_spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    providers = candidate_providers(options.providers)
    errors: list[str] = []
    for i in range(len(providers)):
        chain = providers[i:]
        try:
            sess = ort.InferenceSession(model, so, providers=chain)
        except Exception as exc:  # a provider that is offered but cannot start (no driver, no libs)
            errors.append(f"{chain[0]}: {exc}")
            continue
        if errors:
            log.warning("providers failed to initialise, fell back: %s", "; ".join(errors))
        return sess
    raise RuntimeError("no ONNX Runtime provider could load the model: " + "; ".join(errors))


class OnnxModel:
    """A model artefact loaded for inference: session + metadata + the shared preprocessing."""

    def __init__(self, path: str | os.PathLike, metadata: ModelMetadata | None = None,
                 options: RuntimeOptions | None = None):
        self.path = Path(path)
        self.options = options or RuntimeOptions()
        self.metadata = metadata or load_metadata(self.path)
        data = self.path.read_bytes()  # one read: the bytes we hash are the bytes we run
        self.sha256 = hashlib.sha256(data).hexdigest()
        if self.options.verify_sha256 and self.metadata.onnx_sha256 and self.sha256 != self.metadata.onnx_sha256:
            raise ModelIntegrityError(
                f"{self.path}: sha256 {self.sha256[:12]}… does not match metadata {self.metadata.onnx_sha256[:12]}…")
        self.session = create_session(data, self.options)
        self.providers = self.session.get_providers()
        self._output_names = [o.name for o in self.session.get_outputs()]
        missing = {OUTPUT_PROBS, OUTPUT_EMBEDDING} - set(self._output_names)
        if missing or self.session.get_inputs()[0].name != INPUT_NAME:
            raise ValueError(f"{self.path}: not a defect-pipeline model (outputs {self._output_names})")

    @property
    def provider(self) -> str:
        """The provider that runs the model (first of the session's chain)."""
        return self.providers[0]

    @property
    def classes(self) -> list[str]:
        return self.metadata.classes

    def preprocess(self, images: list[np.ndarray]) -> np.ndarray:
        return preprocess(images, self.metadata.preprocess)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model input batch -> (probabilities (N, C), embeddings (N, D)), chunked by max_batch."""
        probs, embs = [], []
        for start in range(0, max(len(batch), 1), self.options.max_batch):
            chunk = batch[start:start + self.options.max_batch]
            if len(chunk) == 0:
                break
            out = dict(zip(self._output_names, self.session.run(None, {INPUT_NAME: chunk})))
            probs.append(out[OUTPUT_PROBS])
            embs.append(out[OUTPUT_EMBEDDING])
        if not probs:
            n_cls = len(self.classes)
            return np.zeros((0, n_cls), np.float32), np.zeros((0, self.metadata.embedding_dim), np.float32)
        return np.concatenate(probs), np.concatenate(embs)

    def decide(self, probs: np.ndarray) -> list[Prediction]:
        """Class probabilities -> predictions with the model's operating threshold applied."""
        thr, classes = self.metadata.threshold, self.classes
        # float32 like pipeline.evaluate.defect_scores: the threshold sits one float above a
        # validation score, so evaluation and serving must round identically.
        scores = np.float32(1.0) - probs[:, self.metadata.good_index].astype(np.float32)
        labels = probs.argmax(1)
        return [Prediction(label=classes[int(k)], probabilities={c: float(p) for c, p in zip(classes, row)},
                           defect_score=float(s), decision="defect" if float(s) >= thr else "good")
                for row, s, k in zip(probs, scores, labels)]

    def predict(self, images: list[np.ndarray]) -> list[Prediction]:
        """Decoded RGB uint8 images -> predictions."""
        probs, _ = self.run(self.preprocess(images))
        return self.decide(probs)
