"""Few-shot fine-tuning: the classic two-stage transfer-learning recipe, sized for 5-50 images per class.

Stage 1 trains a linear head on cached backbone features (a few augmented views per image):
seconds, and a good start. Stage 2 unfreezes the top blocks with a lower learning rate and
trains on augmented batches with class-balanced sampling, keeping the epoch with the best
validation balanced accuracy. BatchNorm layers stay in inference mode throughout: batch
statistics from 16 images of 6 classes are noise, the ImageNet ones are not.

Knows nothing about ONNX or Prefect; returns a ``TrainResult`` that export and evaluation take.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pipeline.backbones import build_backbone, default_preprocess
from pipeline.backbones.efficientnet_lite import EfficientNetLite
from pipeline.data.augment import AugmentConfig, augment, load_images, to_float_nchw, torch_normalize
from pipeline.data.folders import ImageFolder
from pipeline.data.masks import load_masks
from pipeline.preprocess import PreprocessSpec

if TYPE_CHECKING:
    from pipeline.metadata import ModelMetadata

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class TrainConfig(BaseModel):
    """The fine-tuning recipe. Defaults are what the magnetic-tile benchmark uses."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent default

    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    img_size: int | None = Field(None, ge=32, le=1024)  # None: the backbone's native size
    resize: str = Field("stretch", pattern="^(stretch|letterbox)$")
    # per-image exposure normalisation, stored in the model's PreprocessSpec (see pipeline.preprocess)
    exposure: str = Field("none", pattern="^(none|gain|standardize|clahe)$")
    seed: int = 0
    # stage 1: linear head on cached features
    feature_views: int = Field(4, ge=1, le=32)
    head_steps: int = Field(300, ge=0)
    head_lr: float = 3e-3
    # stage 2: partial unfreeze
    finetune_epochs: int = Field(15, ge=0)
    unfreeze_blocks: int = Field(6, ge=0)  # top MBConv blocks trained (plus the 1x1 head conv)
    lr: float = 1e-3
    backbone_lr_scale: float = 0.3
    weight_decay: float = 1e-4
    batch_size: int = Field(16, ge=2)
    # Stage-2 batches per epoch. "auto": AUTO_STEPS[0] (what the measured few-shot recipe uses) times the
    # good-class weight, at most AUTO_STEPS[1]: when good parts are drawn more often the epoch grows with them
    # rather than taking draws from the defect classes. None: one pass over the training set.
    steps_per_epoch: Annotated[int, Field(ge=1)] | Literal["auto"] | None = "auto"
    patience: int = Field(6, ge=1)
    # "last": the fixed one-cycle schedule decides (few-shot validation sets of ~30 images are too noisy to
    # pick epochs: measured on magnetic-tile, "best" kept the head-only model at 0.747 balanced accuracy,
    # "last" reached 0.782); "best": the epoch with the best validation balanced accuracy.
    keep: str = Field("last", pattern="^(best|last)$")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    # How often the good class is drawn in stage-2 batches (and its stage-1 loss weight) relative to each
    # defect class: 1.0 draws every class equally often. "auto": square-root sampling for the good class,
    # sqrt(good images / mean defect-class images), between 1 and AUTO_GOOD_WEIGHT_MAX. A line gives many more
    # good parts than defects, and they vary most: drawn only as often as one defect class, each good image is
    # seen a few times and unseen good parts are called defects (measured on magnetic-tile, BENCHMARKS core).
    good_weight: Annotated[float, Field(gt=0, le=20)] | Literal["auto"] = "auto"
    dropout: float = Field(0.2, ge=0, lt=1)
    # Re-estimate BatchNorm statistics on the (augmented) training images before stage 1 (AdaBN):
    # line images are far from ImageNet, so its statistics misplace every feature.
    bn_adapt_views: int = Field(0, ge=0, le=32)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    # "pooled": one prediction from the image's mean features; "cells": every 32x32 cell of the last
    # feature map is classified and the most defective cell decides (see DefectClassifier); "auto": cells
    # when the run has pixel masks, else pooled. Measured on magnetic-tile, 20 shots (BENCHMARKS core):
    # with masks cells beat pooled on AUROC and on recall at 2 % false rejects on every seed (balanced accuracy
    # about the same); without masks cells lost 9 points.
    head: str = Field("auto", pattern="^(auto|pooled|cells)$")
    cell_loss_weight: float = Field(1.0, ge=0)  # per-cell cross-entropy beside the image-level loss (cells head)
    threads: int | None = None
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$")

    def preprocess_spec(self) -> PreprocessSpec:
        spec = default_preprocess(self.backbone, self.img_size, self.resize)
        return spec if self.exposure == "none" else spec.model_copy(update={"exposure": self.exposure})


AUTO_STEPS = (10, 30)  # bounds of steps_per_epoch="auto"
AUTO_GOOD_WEIGHT_MAX = 4.0


def resolve_sampling(cfg: TrainConfig, labels: np.ndarray | torch.Tensor, good: int) -> tuple[float, int]:
    """The (good_weight, steps_per_epoch) a run uses: ``cfg``'s numbers, or the "auto" rules for these labels."""
    counts = np.bincount(np.asarray(labels), minlength=good + 1)
    weight = cfg.good_weight
    if weight == "auto":
        defect = [n for c, n in enumerate(counts) if c != good and n > 0]
        ratio = counts[good] / float(np.mean(defect)) if defect else 1.0
        weight = float(min(AUTO_GOOD_WEIGHT_MAX, max(1.0, ratio ** 0.5)))
    if cfg.steps_per_epoch == "auto":
        steps = min(AUTO_STEPS[1], max(AUTO_STEPS[0], round(AUTO_STEPS[0] * weight)))
    else:
        steps = cfg.steps_per_epoch or max(4, -(-int(counts.sum()) // cfg.batch_size))
    return weight, steps


class DefectClassifier(nn.Module):
    """Backbone features -> dropout -> linear head.

    ``head="pooled"``: the head sees the image's mean feature vector; ``forward`` gives logits.
    ``head="cells"``: the same linear head classifies every cell of the last feature map (32 x 32 pixels
    at stride 32), and the image is a defect as much as its most defective cell is (see ``cell_probs``).
    A small defect is then not averaged away with the good surface around it, and with pixel masks each
    cell has its own label: every good cell of every image teaches what good surface looks like.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float = 0.2, head: str = "pooled",
                 good_index: int | None = None):
        super().__init__()
        if head not in ("pooled", "cells"):
            raise ValueError(f"head must be 'pooled' or 'cells', got {head!r}")
        if head == "cells" and (good_index is None or not 0 <= good_index < num_classes):
            raise ValueError("the per-cell head needs the good class's index")
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.num_features, num_classes)
        self.head_mode = head
        self.good_index = good_index
        if head == "cells":  # a constant of the graph (not a traced scatter); not part of the checkpoint
            self.register_buffer("good_onehot", F.one_hot(torch.tensor(good_index), num_classes).float(),
                                 persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))

    def cell_logits(self, fmap: torch.Tensor) -> torch.Tensor:
        """(N, D, h, w) feature map -> (N, K, h, w) logits: the linear head applied per cell."""
        return F.conv2d(fmap, self.head.weight[:, :, None, None], self.head.bias)

    def cell_probs(self, cell_logits: torch.Tensor) -> torch.Tensor:
        """Per-cell logits (N, K, h, w) or (N, K, cells) -> image class probabilities (N, K).

        P(defect) = the largest per-cell defect probability (1 - P(good)); it is shared among the defect
        classes in proportion to each class's largest per-cell probability.
        """
        p = torch.softmax(cell_logits, dim=1).flatten(2)  # (N, K, cells)
        good = self.good_onehot.to(p.dtype)
        defect = (1 - p[:, self.good_index]).amax(dim=1, keepdim=True)  # (N, 1)
        share = p.amax(dim=2) * (1 - good)  # (N, K), zero for the good class
        share = share / share.sum(dim=1, keepdim=True).clamp(min=1e-12)
        return defect * share + (1 - defect) * good

    def predict(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images -> (class probabilities, pooled embedding); what export and evaluation use."""
        if self.head_mode == "pooled":
            emb = self.features(x)
            return torch.softmax(self.head(emb), dim=1), emb
        fmap = self.backbone.forward_map(x)
        return self.cell_probs(self.cell_logits(fmap)), fmap.mean(dim=(2, 3))


def classifier_for(meta: "ModelMetadata", weights: str | os.PathLike | None = None) -> DefectClassifier:
    """An untrained ``DefectClassifier`` shaped like the model ``meta`` describes (load its checkpoint next)."""
    return DefectClassifier(build_backbone(meta.backbone, weights), len(meta.classes), head=meta.head,
                            good_index=meta.good_index)


class ExportModule(nn.Module):
    """What goes into ONNX: normalised images -> (class probabilities, pooled embedding)."""

    def __init__(self, clf: DefectClassifier):
        super().__init__()
        self.clf = clf

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clf.predict(images)


@dataclass
class TrainResult:
    model: DefectClassifier
    classes: list[str]
    good_class: str
    spec: PreprocessSpec
    config: TrainConfig
    train_set: ImageFolder
    val_set: ImageFolder
    skipped: list[dict]
    val_labels: np.ndarray
    val_probs: np.ndarray
    val_embeddings: np.ndarray
    train_embeddings: np.ndarray
    train_probs: np.ndarray
    history: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    best_epoch: int = 0
    device: str = "cpu"
    bn_source: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    masked_images: int = 0  # defect training images that had a pixel mask
    sampling: dict[str, float] = field(default_factory=dict)  # good_weight and steps_per_epoch as used


CHECKPOINT_FILE = "checkpoint.npz"


BN_SOURCE_PREFIX = "bn_source."


@torch.no_grad()
def forward_features(model: nn.Module, images_u8: torch.Tensor, spec: PreprocessSpec, device: torch.device,
                     batch: int = 32) -> None:
    """Run the backbone (eval mode) over uint8 NHWC images in batches, for hooks that collect statistics."""
    model.eval()
    for i in range(0, len(images_u8), batch):
        x = torch_normalize(to_float_nchw(images_u8[i:i + batch]), spec).to(device)
        model.features(x.contiguous(memory_format=torch.channels_last))


@contextmanager
def recording_bn_inputs(model: nn.Module) -> Iterator[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per-channel mean and variance of every BatchNorm layer's *input* over the forward passes run inside.

    The yielded dict is filled on exit, so the statistics can ride along a pass that is needed anyway
    (training's final embedding of its images) instead of costing one of their own.
    """
    sums: dict[str, list] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            def hook(mod, args, name=name):
                x = args[0].double()
                acc = sums.setdefault(name, [0.0, 0.0, 0])
                acc[0] = acc[0] + x.sum(dim=(0, 2, 3))
                acc[1] = acc[1] + (x * x).sum(dim=(0, 2, 3))
                acc[2] += x.shape[0] * x.shape[2] * x.shape[3]
            hooks.append(m.register_forward_pre_hook(hook))
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()
    for name, (s1, s2, n) in sums.items():
        mean = s1 / n
        out[name] = (mean.cpu().numpy(), (s2 / n - mean * mean).clamp(min=0).cpu().numpy())


@torch.no_grad()
def bn_input_stats(model: nn.Module, images_u8: torch.Tensor, spec: PreprocessSpec, device: torch.device,
                   batch: int = 32) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel mean and variance of every BatchNorm layer's *input* over these images (eval mode)."""
    with recording_bn_inputs(model) as stats:
        forward_features(model, images_u8, spec, device, batch)
    return stats


def save_checkpoint(model: DefectClassifier, path: str | os.PathLike,
                    bn_source: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> None:
    """Weights as a plain ``.npz`` of arrays: loadable without pickle, copied by the registry.

    ``bn_source``: BatchNorm input statistics on the training domain, which label-free adaptation
    needs to map a new domain back onto what the head was trained on.
    """
    arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    for name, (mean, var) in (bn_source or {}).items():
        arrays[f"{BN_SOURCE_PREFIX}{name}.mean"] = mean
        arrays[f"{BN_SOURCE_PREFIX}{name}.var"] = var
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """State dict from ``save_checkpoint`` (``allow_pickle=False``: tensors only, never code)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: torch.from_numpy(z[k].copy()) for k in z.files if not k.startswith(BN_SOURCE_PREFIX)}


def load_bn_source(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The training-domain BatchNorm input statistics stored by ``save_checkpoint`` (empty if none)."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as z:
        for k in z.files:
            if k.startswith(BN_SOURCE_PREFIX) and k.endswith(".mean"):
                name = k[len(BN_SOURCE_PREFIX):-len(".mean")]
                out[name] = (z[k].copy(), z[f"{BN_SOURCE_PREFIX}{name}.var"].copy())
    return out


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    recalls = [float((pred[y == c] == c).mean()) for c in range(n_classes) if (y == c).any()]
    return float(np.mean(recalls)) if recalls else float("nan")


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _set_threads(cfg: TrainConfig) -> None:
    torch.set_num_threads(cfg.threads or len(os.sched_getaffinity(0)))


@torch.no_grad()
def embed(model: DefectClassifier, images_u8: torch.Tensor, spec: PreprocessSpec, device: torch.device,
          batch: int = 32, aug: AugmentConfig | None = None, gen: torch.Generator | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, probabilities) for uint8 NHWC images, optionally augmented."""
    model.eval()
    embs, probs = [], []
    for i in range(0, len(images_u8), batch):
        x = to_float_nchw(images_u8[i:i + batch])
        if aug is not None:
            x = augment(x, aug, gen)
        x = torch_normalize(x, spec).to(device).contiguous(memory_format=torch.channels_last)
        p, e = model.predict(x)
        embs.append(e.float().cpu())
        probs.append(p.float().cpu())
    if not embs:
        return np.zeros((0, model.backbone.num_features), np.float32), np.zeros((0, model.head.out_features), np.float32)
    return torch.cat(embs).numpy(), torch.cat(probs).numpy()


@torch.no_grad()
def adapt_batchnorm(model: DefectClassifier, images_u8: torch.Tensor, spec: PreprocessSpec, device: torch.device,
                    views: int, aug: AugmentConfig | None, gen: torch.Generator | None, batch: int = 32) -> None:
    """AdaBN: replace BatchNorm running statistics by the exact averages over these images.

    Used at training time (line images vs ImageNet) and for label-free re-adaptation to a new domain.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or views <= 0 or len(images_u8) == 0:
        return
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: exact mean over all batches seen
        m.train()
    for v in range(views):
        for i in range(0, len(images_u8), batch):
            x = to_float_nchw(images_u8[i:i + batch])
            if v > 0 and aug is not None:
                x = augment(x, aug, gen)
            model.features(torch_normalize(x, spec).to(device).contiguous(memory_format=torch.channels_last))
    for m, (mom, training) in zip(bns, saved):
        m.momentum = mom
        m.train(training)


def _class_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=n_classes).float().clamp(min=1)
    w = counts.sum() / (n_classes * counts)
    return w / w.mean()


def _train_head(model: DefectClassifier, feats: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
                n_classes: int, class_share: torch.Tensor | None = None) -> None:
    """Stage 1: full-batch AdamW on cached features with class-balanced cross-entropy
    (times ``class_share`` per class, if given)."""
    head = model.head
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.head_lr, weight_decay=cfg.weight_decay)
    w = _class_weights(labels, n_classes)
    if class_share is not None:
        w = w * class_share / class_share.mean()
    w = w.to(feats.device)
    for _ in range(cfg.head_steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(F.dropout(feats, cfg.dropout)), labels, weight=w,
                               label_smoothing=cfg.label_smoothing)
        loss.backward()
        opt.step()


@torch.no_grad()
def _view_features(model: DefectClassifier, x_u8: torch.Tensor, masks: torch.Tensor | None, spec: PreprocessSpec,
                   device: torch.device, aug: AugmentConfig | None, gen: torch.Generator, batch: int = 32
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stage-1 cache for one view of the uint8 NHWC training images: (features, masks as augmented).

    Features are pooled vectors for the pooled head, (N, P, D) per-cell rows for the per-cell head."""
    model.eval()
    feats, out_masks = [], []
    for i in range(0, len(x_u8), batch):
        xb = to_float_nchw(x_u8[i:i + batch])
        mb = None if masks is None else masks[i:i + batch]
        if aug is not None and mb is not None:
            xb, mb = augment(xb, aug, gen, masks=mb)
        elif aug is not None:
            xb = augment(xb, aug, gen)
        xb = torch_normalize(xb, spec).to(device).contiguous(memory_format=torch.channels_last)
        f = _as_cells(model.backbone.forward_map(xb)) if model.head_mode == "cells" else model.features(xb)
        feats.append(f.float().contiguous().cpu())
        out_masks.append(mb)
    return torch.cat(feats), None if masks is None else torch.cat(out_masks)


def _train_cell_head(model: DefectClassifier, cells: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
                     cfg: TrainConfig, progress: Callable[[int, int], None] | None = None) -> None:
    """Stage 1 for the per-cell head: full-batch AdamW on cached per-cell features (N, P, D) (tens of seconds
    on 2 cores at 20 shots, hence the progress)."""
    opt = torch.optim.AdamW(model.head.parameters(), lr=cfg.head_lr, weight_decay=cfg.weight_decay)
    model.dropout.train()
    for step in range(cfg.head_steps):
        opt.zero_grad(set_to_none=True)
        _cell_loss(model, cells, labels, targets, cfg).backward()
        opt.step()
        if progress and ((step + 1) % 25 == 0 or step + 1 == cfg.head_steps):
            progress(step + 1, cfg.head_steps)
    model.dropout.eval()


def _trainable_params(model: DefectClassifier, cfg: TrainConfig) -> list[dict]:
    """Freeze everything but the top ``unfreeze_blocks`` blocks, the head conv and the classifier."""
    bb = model.backbone
    for p in bb.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    if cfg.unfreeze_blocks > 0:
        if isinstance(bb, EfficientNetLite):
            k = min(cfg.unfreeze_blocks, len(bb._blocks))
            modules = list(bb._blocks[len(bb._blocks) - k:]) + [bb._conv_head, bb._bn1]
            for m in modules:
                for p in m.parameters():
                    p.requires_grad_(True)
                    params.append(p)
        else:  # unknown layout: fine-tune the whole backbone at the low rate
            for p in bb.parameters():
                p.requires_grad_(True)
                params.append(p)
    groups = [{"params": list(model.head.parameters()), "lr": cfg.lr}]
    if params:
        groups.append({"params": params, "lr": cfg.lr * cfg.backbone_lr_scale})
    return groups


def _balanced_batches(labels: torch.Tensor, n_classes: int, batch: int, steps: int,
                      gen: torch.Generator, class_share: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Each batch draws classes uniformly (or in proportion to ``class_share``), then an image of that class:
    rare defects seen as often as good parts."""
    by_class = [torch.nonzero(labels == c).flatten() for c in range(n_classes)]
    present = [c for c in range(n_classes) if len(by_class[c])]
    out = []
    for _ in range(steps):
        if class_share is None:
            pick = torch.randint(len(present), (batch,), generator=gen)
        else:
            pick = torch.multinomial(class_share[present].double(), batch, replacement=True, generator=gen)
        cls = torch.tensor(present)[pick]
        idx = [by_class[c][torch.randint(len(by_class[c]), (1,), generator=gen)].item() for c in cls.tolist()]
        out.append(torch.tensor(idx))
    return out


def _train_masks(train_set: ImageFolder, masks_dir: str | os.PathLike, spec: PreprocessSpec, good_class: str,
                 skipped: list[dict], y_train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks (N, H, W) 0..1, has-mask flags) aligned with the decoded training images (unreadable ones
    dropped). ValueError when no defect image has a usable mask: the folder is wrong, and training on as if
    there were none would go unnoticed."""
    masks, problems = load_masks(train_set, masks_dir, spec, good_class)
    for p in problems:
        log.warning("mask not used for %s: %s", p["path"], p["error"])
    dropped = {s["path"] for s in skipped}
    keep = [i for i, s in enumerate(train_set.samples) if str(s.path) not in dropped]
    masks = masks[keep]
    has_mask = masks.flatten(1).amax(1) > 0
    n_defect = int((y_train != train_set.classes.index(good_class)).sum())
    log.info("defect masks: %d of %d defect training images", int(has_mask.sum()), n_defect)
    if not has_mask.any():
        raise ValueError(f"{masks_dir}: no mask with a defect for any defect training image (expected "
                         f"{masks_dir}/<class>/<image stem>.png, non-zero where the defect is)")
    return masks, has_mask


CELL_CACHE_BYTES = 512 << 20  # stage-1 per-cell feature cache bound (all views together)
IGNORE = -100  # cell target: not trained (near a defect's edge, or a defect image without a mask)


def cell_targets(masks: torch.Tensor | None, has_mask: torch.Tensor, labels: torch.Tensor, good: int,
                 grid: tuple[int, int]) -> torch.Tensor:
    """Per-cell class targets (N, h, w) for the per-cell head.

    Good images: every cell good. Defect images with a mask: cells the mask touches get the image's
    class, the ring of cells around them is ignored (their receptive field sees the defect), the rest is
    good surface. Defect images without a mask (``masks`` None: none has one): all ignored (the
    image-level loss still trains them).
    """
    if masks is None:
        masks = torch.zeros(len(labels), *grid)
    pooled = F.adaptive_max_pool2d(masks.unsqueeze(1), grid).squeeze(1)
    # a cell is touched where the (area-resized, so fractional at the edges) mask reaches a quarter; a defect
    # so small that resizing left less everywhere still touches the cells where it is strongest
    peak = pooled.flatten(1).amax(1).view(-1, 1, 1)
    touched = (pooled > torch.clamp(0.5 * peak, max=0.25)) & (peak > 0)
    ring = F.max_pool2d(touched.unsqueeze(1).float(), 3, stride=1, padding=1).squeeze(1) > 0
    t = torch.full(touched.shape, good, dtype=torch.long)
    t[ring] = IGNORE
    cls = labels.view(-1, 1, 1).expand_as(t)
    t = torch.where(touched, cls, t)
    is_good = (labels == good).view(-1, 1, 1)
    t = torch.where(is_good, torch.full_like(t, good), t)
    return torch.where(is_good | has_mask.view(-1, 1, 1), t, torch.full_like(t, IGNORE))


def _as_cells(fmap: torch.Tensor) -> torch.Tensor:
    """(N, D, h, w) feature map -> (N, h*w, D) rows, so the head is one matrix product per batch."""
    return fmap.permute(0, 2, 3, 1).reshape(fmap.shape[0], -1, fmap.shape[1])


def _cell_loss(model: DefectClassifier, cells: torch.Tensor, y: torch.Tensor, targets: torch.Tensor,
               cfg: TrainConfig) -> torch.Tensor:
    """Image-level loss on the aggregated probabilities + per-cell cross-entropy.

    ``cells``: (N, P, D) features per cell (``_as_cells``); ``targets``: (N, P) from ``cell_targets``.
    """
    if model.dropout.training and cfg.dropout > 0:
        # Channel dropout shared by an image's cells (Dropout2d's rule), applied to the head's weights: per
        # image, W (x * keep) = (W * keep) x, so the dropped copy of the features (the whole stage-1 cache,
        # every step) is never written: the same draws, the same loss up to float rounding, 2x faster on 2
        # cores (a 20-shot run amplifies that rounding as much as a change of seed: BENCHMARKS core)
        keep = torch.rand(cells.shape[0], 1, cells.shape[2], device=cells.device) >= cfg.dropout
        w = model.head.weight.unsqueeze(0) * (keep.to(cells.dtype) / (1 - cfg.dropout))  # (N, K, D)
        logits = torch.baddbmm(model.head.bias.view(1, -1, 1), w, cells.transpose(1, 2))  # (N, K, P)
    else:
        logits = model.head(cells).transpose(1, 2)  # (N, K, P)
    logp = torch.log(model.cell_probs(logits).clamp(min=1e-6))
    eps = cfg.label_smoothing
    image = (1 - eps) * F.nll_loss(logp, y) - eps * logp.mean(dim=1).mean()
    if not (targets != IGNORE).any():
        return image
    per_cell = F.cross_entropy(logits, targets, ignore_index=IGNORE, label_smoothing=eps)
    return image + cfg.cell_loss_weight * per_cell


def train(train_set: ImageFolder, val_set: ImageFolder, good_class: str, cfg: TrainConfig | None = None,
          progress: Progress | None = None, init_state: dict | None = None,
          masks_dir: str | os.PathLike | None = None) -> TrainResult:
    """Fine-tune a pretrained backbone on ``train_set``; select the epoch on ``val_set``.

    ``init_state``: a ``DefectClassifier`` state dict to warm-start from (e.g. the champion's), same classes.
    ``masks_dir``: defect pixel masks mirroring ``train_set``'s folders (``pipeline.data.masks``), which
    give the per-cell head its cell labels.
    """
    cfg = cfg or TrainConfig()
    _set_threads(cfg)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = _device(cfg)
    spec = cfg.preprocess_spec()
    classes = list(train_set.classes)
    n_classes = len(classes)
    if good_class not in classes:
        raise ValueError(f"good class {good_class!r} is not among the class folders {classes}")
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    cb = (lambda d, n: progress("decode", d, n)) if progress else None
    x_train, y_train, skipped = load_images(train_set, spec, cb)
    x_val, y_val, skipped_val = load_images(val_set, spec)
    skipped += skipped_val
    for s in skipped:
        log.warning("skipped unreadable image %s: %s", s["path"], s["error"])
    missing = [classes[c] for c in range(n_classes) if not (y_train == c).any()]
    if missing:
        raise ValueError(f"no readable training images for classes {missing}")
    good = classes.index(good_class)
    good_weight, steps = resolve_sampling(cfg, y_train, good)
    class_share = None
    if good_weight != 1.0:
        class_share = torch.ones(n_classes)
        class_share[good] = good_weight
    masks: torch.Tensor | None = None
    has_mask = torch.zeros(len(y_train), dtype=torch.bool)
    if masks_dir is not None:
        masks, has_mask = _train_masks(train_set, masks_dir, spec, good_class, skipped, y_train)
    timings["decode_s"] = time.perf_counter() - t0

    head = cfg.head if cfg.head != "auto" else ("cells" if masks is not None else "pooled")
    cells = head == "cells"
    model = DefectClassifier(build_backbone(cfg.backbone, cfg.weights), n_classes, cfg.dropout, head, good)
    if init_state is not None:
        model.load_state_dict(init_state)
    model = model.to(device).to(memory_format=torch.channels_last)
    model.eval()
    grid = (0, 0)
    if cells:  # the last feature map's cells, which cell_targets pools the masks to
        with torch.no_grad():
            grid = tuple(model.backbone.forward_map(torch.zeros(1, 3, spec.height, spec.width, device=device)).shape[2:])
    if init_state is None and cfg.bn_adapt_views:
        t0 = time.perf_counter()
        adapt_batchnorm(model, x_train, spec, device, cfg.bn_adapt_views, cfg.augment, gen)
        timings["bn_adapt_s"] = time.perf_counter() - t0

    # Stage 1: head on cached features of a few augmented views (a warm start keeps its trained head).
    t0 = time.perf_counter()
    if init_state is None:
        views_f, views_y, views_t = [], [], []
        n_views = cfg.feature_views
        if cells:  # the per-cell cache holds every cell's features: bound it (a full-size dataset gets one view)
            per_view = len(x_train) * grid[0] * grid[1] * model.backbone.num_features * 4
            n_views = max(1, min(n_views, CELL_CACHE_BYTES // max(per_view, 1)))
            if n_views < cfg.feature_views:
                log.info("per-cell head: %d of %d feature views fit the %d MB cache", n_views, cfg.feature_views,
                         CELL_CACHE_BYTES >> 20)
        for v in range(n_views):
            f, m = _view_features(model, x_train, masks, spec, device, None if v == 0 else cfg.augment, gen)
            views_f.append(f)
            views_y.append(y_train)
            if cells:
                views_t.append(cell_targets(m, has_mask, y_train, good, grid).flatten(1))
            if progress:
                progress("features", v + 1, n_views)
        feats, labels = torch.cat(views_f).to(device), torch.cat(views_y).to(device)
        if cells:
            _train_cell_head(model, feats, labels, torch.cat(views_t).to(device), cfg,
                             (lambda d, n: progress("head", d, n)) if progress else None)
        else:
            _train_head(model, feats, labels, cfg, n_classes, class_share)
    timings["stage1_head_s"] = time.perf_counter() - t0

    history: list[dict] = []

    def validate(epoch: int, loss: float) -> float:
        _, p = embed(model, x_val, spec, device)
        bacc = balanced_accuracy(y_val.numpy(), p.argmax(1), n_classes) if len(y_val) else float("nan")
        vloss = float(F.cross_entropy(torch.from_numpy(np.log(p + 1e-9)), y_val).item()) if len(y_val) else float("nan")
        history.append({"epoch": epoch, "train_loss": loss, "val_balanced_accuracy": bacc, "val_loss": vloss})
        return bacc if bacc == bacc else -vloss

    # Stage 2: partial unfreeze, balanced batches, keep the best epoch.
    t0 = time.perf_counter()
    best_score, best_state, best_epoch, since_best = validate(0, float("nan")), None, 0, 0
    best_key = (best_score, -history[-1]["val_loss"])
    best_state = copy.deepcopy(model.state_dict())
    groups = _trainable_params(model, cfg)
    total = cfg.finetune_epochs * steps
    if total:
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in groups], total_steps=total, pct_start=0.15)
        w = _class_weights(y_train, n_classes).to(device)
        for epoch in range(1, cfg.finetune_epochs + 1):
            model.eval()  # BatchNorm keeps ImageNet statistics
            model.dropout.train()
            losses = []
            for idx in _balanced_batches(y_train, n_classes, cfg.batch_size, steps, gen, class_share):
                if masks is None:
                    x, m = augment(to_float_nchw(x_train[idx]), cfg.augment, gen), None
                else:
                    x, m = augment(to_float_nchw(x_train[idx]), cfg.augment, gen, masks=masks[idx])
                x = torch_normalize(x, spec).to(device).contiguous(memory_format=torch.channels_last)
                y = y_train[idx].to(device)
                if cells:
                    t = cell_targets(m, has_mask[idx], y_train[idx], good, grid).flatten(1).to(device)
                    loss = _cell_loss(model, _as_cells(model.backbone.forward_map(x)), y, t, cfg)
                else:
                    loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
            score = validate(epoch, float(np.mean(losses)))
            key = (score, -history[-1]["val_loss"])
            if key > best_key:
                best_key, best_state, best_epoch, since_best = key, copy.deepcopy(model.state_dict()), epoch, 0
            else:
                since_best += 1
            if progress:
                progress("finetune", epoch, cfg.finetune_epochs)
            if cfg.keep == "best" and since_best >= cfg.patience:
                log.info("early stop at epoch %d (best %d)", epoch, best_epoch)
                break
    if cfg.keep == "best":
        model.load_state_dict(best_state)
    else:
        best_epoch = history[-1]["epoch"]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    timings["stage2_finetune_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    val_emb, val_probs = embed(model, x_val, spec, device)
    with recording_bn_inputs(model) as bn_source:  # training-domain statistics for label-free adaptation
        train_emb, train_probs = embed(model, x_train, spec, device)
    timings["final_embed_s"] = time.perf_counter() - t0
    model = model.cpu().to(memory_format=torch.contiguous_format)
    return TrainResult(
        model=model, classes=classes, good_class=good_class, spec=spec, config=cfg,
        train_set=train_set, val_set=val_set, skipped=skipped,
        val_labels=y_val.numpy(), val_probs=val_probs, val_embeddings=val_emb,
        train_embeddings=train_emb, train_probs=train_probs,
        history=history, timings=timings, best_epoch=best_epoch, device=str(device), bn_source=bn_source,
        masked_images=int(has_mask.sum()), sampling={"good_weight": round(good_weight, 3), "steps_per_epoch": steps},
    )
