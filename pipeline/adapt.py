"""Label-free re-adaptation to a new image domain (AdaBN) and the checks that judge it without labels.

When the lamp changes, the network's filters still find the same defects; what moves are the
activation statistics. AdaBN re-estimates every BatchNorm's running mean/variance on images of the
new domain, which maps new-domain features back to where the head expects them. No labels needed.

Without labels nobody can measure accuracy, so the candidate is judged by checks that need none
(documented in ``label_free_checks``), and a labelling request is written so an operator can supply
the labels a supervised gate needs.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.data.decode import ImageDecodeError, decode_file
from pipeline.drift.check import list_images
from pipeline.metadata import ModelMetadata, load_metadata, write_json_atomic
from pipeline.preprocess import PreprocessSpec


class LabelFreeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent default

    max_images: int = Field(512, ge=8)
    min_images: int = Field(32, ge=8)
    bn_views: int = Field(2, ge=1, le=16)  # the new images, plus augmented copies
    # checks
    min_novelty_reduction: float = Field(0.25, ge=0, le=1)  # fraction of the champion's excess novelty removed
    max_defect_rate_change: float = Field(0.15, ge=0, le=1)  # vs the training domain's predicted defect rate
    labelling_request_size: int = Field(30, ge=0)
    seed: int = 0


@dataclass
class LabelFreeResult:
    out_dir: Path
    onnx_path: Path
    checks: dict
    passed: bool
    labelling_request: Path | None
    timings: dict[str, float]


def _load_images(folder: Path, limit: int, seed: int, spec: PreprocessSpec) -> tuple[list[np.ndarray], list[Path]]:
    paths = list_images(folder)
    rng = np.random.default_rng(seed)
    if len(paths) > limit:
        paths = [paths[i] for i in sorted(rng.choice(len(paths), limit, replace=False))]
    images, kept = [], []
    for p in paths:
        try:
            images.append(decode_file(p, spec=spec))
            kept.append(p)
        except (ImageDecodeError, OSError):
            continue
    return images, kept


def align_batchnorm(model, source: dict, images_u8, spec, device, batch: int = 32) -> int:
    """Re-target every BatchNorm so new-domain inputs are normalised onto the training domain's distribution.

    For a layer with frozen statistics (mu0, sigma0), the head was trained on (x_s - mu0) / sigma0 with
    x_s ~ (m_s, s_s) on the training domain. For new-domain inputs x_t ~ (m_t, s_t) choose
    sigma' = sigma0 * s_t / s_s and mu' = m_t - (m_s - mu0) * s_t / s_s, so (x_t - mu') / sigma' has the
    training domain's normalised distribution.

    A layer's (m_t, s_t) must be measured with every layer before it already aligned (after the first
    layers are aligned, deeper inputs look like the training domain again and need little change).
    Measuring all layers on the unaligned network and re-measuring (the first implementation) corrects
    each shift once per layer it passes through: it diverged, and even same-domain images turned a
    magnetic-tile model into a one-class predictor. So one forward pass aligns every layer on the fly
    with the batch's statistics (the same mapping, batch moments for (m_t, s_t)); the downstream
    layers thus see aligned inputs, and each layer's dataset-level (m_t, s_t) is accumulated from
    those and written as its final statistics. Returns the number of layers aligned.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    from pipeline.train import forward_features

    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and n in source}
    src = {n: tuple(torch.as_tensor(a, dtype=torch.float64) for a in source[n]) for n in bns}
    sums: dict[str, list] = {n: [0.0, 0.0, 0] for n in bns}

    def hook(mod, args, output, name):  # replaces the layer's output by the batch-aligned one
        x = args[0]
        m_s, v_s = src[name]
        xd = x.double()
        dims = (0, 2, 3)
        m_b = xd.mean(dim=dims)
        v_b = xd.var(dim=dims, unbiased=False)
        acc = sums[name]
        acc[0] = acc[0] + xd.sum(dim=dims)
        acc[1] = acc[1] + (xd * xd).sum(dim=dims)
        acc[2] += x.shape[0] * x.shape[2] * x.shape[3]
        ratio = torch.sqrt((v_b + mod.eps) / (v_s + mod.eps))
        shape = (1, -1, 1, 1)
        aligned = ((xd - m_b.view(shape)) / ratio.view(shape) + m_s.view(shape)).to(x.dtype)
        return F.batch_norm(aligned, mod.running_mean, mod.running_var, mod.weight, mod.bias, False, 0.0, mod.eps)

    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n, m in bns.items()]
    try:
        forward_features(model, images_u8, spec, device, batch)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for n, m in bns.items():
            s1, s2, count = sums[n]
            if not count:
                continue
            m_t = s1 / count
            v_t = (s2 / count - m_t * m_t).clamp(min=0)
            m_s, v_s = src[n]
            mu0, var0 = m.running_mean.double(), m.running_var.double()
            ratio = torch.sqrt((v_t + m.eps) / (v_s + m.eps))
            m.running_mean.copy_((m_t - (m_s - mu0) * ratio).to(m.running_mean.dtype))
            m.running_var.copy_(((var0 + m.eps) * ratio * ratio - m.eps).clamp(min=1e-8).to(m.running_var.dtype))
    return len(bns)


def label_free_checks(champion_emb: np.ndarray, candidate_emb: np.ndarray, champion_probs: np.ndarray,
                      candidate_probs: np.ndarray, reference, meta: ModelMetadata, cfg: LabelFreeConfig) -> dict:
    """The agreed checks for a candidate that no label can judge.

    1. *Back toward the training domain*: the candidate's embeddings of the new images must sit closer to
       the champion's training-domain reference than the champion's own embeddings of them (mean
       standardised Mahalanobis novelty, reduced by at least ``min_novelty_reduction`` of its excess over 0).
    2. *Plausible decisions*: the candidate's predicted defect rate on the new images stays within
       ``max_defect_rate_change`` of the training domain's predicted defect rate (a lamp change does not
       make the line produce three times more scrap; a model that says so is broken, not right).
    3. *Not less sure*: the candidate's mean top-class probability is not lower than the champion's.
    """
    nov = lambda e: float(reference.standardise_novelty(reference.novelty(e)[0]).mean())  # noqa: E731
    champ_nov, cand_nov = nov(champion_emb), nov(candidate_emb)
    reduction = (champ_nov - cand_nov) / max(champ_nov, 1e-6) if champ_nov > 0 else 0.0
    good = meta.good_index
    # share of training-domain images predicted as some defect class (the reference's class frequencies)
    train_defect_rate = 1.0 - float(reference.class_freq[good])
    rate = lambda p: float(((np.float32(1) - p[:, good].astype(np.float32)) >= meta.threshold).mean())  # noqa: E731
    champ_rate, cand_rate = rate(champion_probs), rate(candidate_probs)
    base_rate = train_defect_rate
    conf = lambda p: float(p.max(1).mean())  # noqa: E731
    checks = {
        "novelty_champion": champ_nov, "novelty_candidate": cand_nov, "novelty_reduction": reduction,
        "novelty_ok": bool(champ_nov > 0 and reduction >= cfg.min_novelty_reduction),
        "defect_rate_training": base_rate, "defect_rate_champion": champ_rate, "defect_rate_candidate": cand_rate,
        "defect_rate_ok": bool(abs(cand_rate - base_rate) <= cfg.max_defect_rate_change),
        "confidence_champion": conf(champion_probs), "confidence_candidate": conf(candidate_probs),
    }
    checks["confidence_ok"] = bool(checks["confidence_candidate"] >= checks["confidence_champion"] - 1e-3)
    checks["passed"] = bool(checks["novelty_ok"] and checks["defect_rate_ok"] and checks["confidence_ok"])
    return checks


def write_labelling_request(out_dir: Path, paths: list[Path], probs: np.ndarray, meta: ModelMetadata, n: int,
                            reason: str) -> Path | None:
    """Copy the images an operator should label first (least certain first) into ``out_dir/unlabelled``."""
    if n <= 0 or not paths:
        return None
    order = np.argsort(probs.max(1))[:n]  # least confident first
    req = out_dir / "unlabelled"
    req.mkdir(parents=True, exist_ok=True)
    for i in order:
        src = paths[int(i)]
        shutil.copy2(src, req / src.name)
    (out_dir / "README.txt").write_text(
        f"Labelling request ({reason}).\n\nMove each image in unlabelled/ into a folder named after its class:\n"
        + "".join(f"  {c}/{'   <- defect-free' if c == meta.good_class else ''}\n" for c in meta.classes)
        + "\nthen run: defect adapt --line LINE --data THIS_FOLDER\n")
    return out_dir


def adapt_label_free(model_dir: Path, images_dir: Path, out_dir: Path, cfg: LabelFreeConfig | None = None,
                     labelling_dir: Path | None = None) -> LabelFreeResult:
    """AdaBN the model in ``model_dir`` (``checkpoint.npz`` + ``model.onnx``) to the images in ``images_dir``.

    Writes a complete run folder (ONNX with parity, metadata, drift reference of the new domain,
    ``label_free_checks.json``) into ``out_dir``; the caller's gate decides whether to promote it.
    """
    import torch

    from pipeline.data.augment import AugmentConfig
    from pipeline.drift import fit_reference, image_statistics_batch, load_reference
    from pipeline.export import finalize_artefact, export_onnx, parity_check
    from pipeline.preprocess import resize_image
    from pipeline.runtime import OnnxModel
    from pipeline.train import (CHECKPOINT_FILE, bn_input_stats, adapt_batchnorm, classifier_for, embed, load_bn_source,
                                load_checkpoint, save_checkpoint)

    cfg = cfg or LabelFreeConfig()
    t_start = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = load_metadata(model_dir / "model.onnx")
    ckpt = model_dir / CHECKPOINT_FILE
    if not ckpt.is_file():
        raise FileNotFoundError(f"{model_dir} has no {CHECKPOINT_FILE}: label-free adaptation needs the weights")
    images, paths = _load_images(Path(images_dir), cfg.max_images, cfg.seed, meta.preprocess)
    if len(images) < cfg.min_images:
        raise ValueError(f"{images_dir}: {len(images)} readable images; label-free adaptation needs "
                         f"at least {cfg.min_images}")
    spec = meta.preprocess
    x = torch.from_numpy(np.stack([resize_image(im, spec) for im in images]))
    clf = classifier_for(meta)
    clf.load_state_dict(load_checkpoint(ckpt))
    clf.eval()
    device = torch.device("cpu")
    champion_emb, champion_probs = embed(clf, x, spec, device)
    source = load_bn_source(ckpt)
    if source:
        align_batchnorm(clf, source, x, spec, device)
    else:  # an older checkpoint without training-domain statistics: plain AdaBN
        gen = torch.Generator().manual_seed(cfg.seed)
        aug = AugmentConfig(gain=0.0, contrast=0.0, gamma=0.0, noise_std=0.0, blur_p=0.0)  # geometry only
        adapt_batchnorm(clf, x, spec, device, cfg.bn_views, aug, gen)
    cand_emb, cand_probs = embed(clf, x, spec, device)
    adapt_s = time.perf_counter() - t_start

    reference = load_reference(model_dir / (meta.drift_reference or "drift_reference.npz"))
    checks = label_free_checks(champion_emb, cand_emb, champion_probs, cand_probs, reference, meta, cfg)

    t0 = time.perf_counter()
    onnx_path = export_onnx(clf, spec, out_dir / "model.onnx")
    new_meta = meta.model_copy(update={
        "metrics": {}, "version": None, "line": None, "onnx_sha256": None,
        "extra": {**meta.extra, "adapted_from": {"model": str(model_dir), "sha256": meta.onnx_sha256},
                  "adaptation": "label-free AdaBN", "adaptation_images": len(images),
                  "label_free_checks": checks}})
    finalize_artefact(onnx_path, new_meta)
    parity = parity_check(clf, onnx_path, images[:32]).as_dict()
    save_checkpoint(clf, out_dir / CHECKPOINT_FILE, bn_source=bn_input_stats(clf, x, spec, device))
    served = OnnxModel(onnx_path)
    probs, emb = served.run(served.preprocess(images))
    ref = fit_reference(emb, image_statistics_batch(images), probs, seed=cfg.seed)
    ref.save(out_dir / (meta.drift_reference or "drift_reference.npz"))
    request = None
    if labelling_dir is not None:
        request = write_labelling_request(Path(labelling_dir), paths, cand_probs, meta, cfg.labelling_request_size,
                                          "label-free adaptation; labels let the gate judge")
    timings = {"adapt_s": round(adapt_s, 2), "export_s": round(time.perf_counter() - t0, 2),
               "total_s": round(time.perf_counter() - t_start, 2)}
    write_json_atomic(out_dir / "label_free_checks.json", json.dumps({"checks": checks, "parity": parity,
                                                                     "timings": timings}, indent=2))
    write_json_atomic(out_dir / "metrics.json", json.dumps({"label_free": checks, "parity": parity,
                                                           "timings": timings}, indent=2))
    return LabelFreeResult(out_dir, onnx_path, checks, checks["passed"], request, timings)
