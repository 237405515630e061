"""The promotion gate: does a retrained challenger deserve to replace the champion?

Both metric dicts must come from evaluating the two models on the SAME evaluation set (the
retrain flow re-scores the champion on the challenger's test split); the gate refuses when it
cannot confirm that (different ``n_images``, ``eval_set_sha256``, class lists or target FRR).
The challenger passes when it does not regress beyond tolerance on balanced accuracy and on
defect recall, and does not raise the false-reject rate beyond tolerance (a looser threshold would
otherwise buy recall with scrapped good parts).

Defect recall is compared two ways. At matched false-reject rate (``defect_recall_at_target_frr_oracle``:
each model's recall when its threshold is set on the gate set's goods at the target FRR) it compares
how well the models separate defects from goods at the operating point, whatever their stored
thresholds. At each model's own threshold (``defect_recall_at_frr``) it is only compared when the
challenger does not reject clearly fewer good parts: after a domain shift the champion's threshold
often rejects far more goods than budgeted (measured on magnetic-tile: 17 % instead of 2 %), and
its higher recall there is bought with scrap, not a reason to keep it.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

REQUIRED_METRICS = ("balanced_accuracy", "defect_recall_at_frr")
MATCHED_RECALL = "defect_recall_at_target_frr_oracle"
FRR_METRIC = "false_reject_rate"
# Must be equal in both dicts; a key present in only one of them means the sets cannot be matched.
SAME_SET_STRICT = ("n_images", "eval_set_sha256")
# Compared when both dicts carry them (older metric files may lack them).
SAME_SET_IF_PRESENT = ("n_good", "n_defect", "classes", "good_class", "target_frr")
_EPS = 1e-9  # float noise: a delta of exactly -tolerance passes


class GateConfig(BaseModel):
    """How much regression a challenger may show and still be promoted."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silent default

    tolerance_balanced_accuracy: float = Field(0.01, ge=0.0, le=1.0)
    tolerance_defect_recall: float = Field(0.01, ge=0.0, le=1.0)
    # Max rise in false-reject rate; None skips the check (and no longer requires the metric).
    tolerance_false_reject_rate: float | None = Field(0.02, ge=0.0, le=1.0)
    # True: besides staying within tolerance, the challenger must beat the champion on at least
    # one of balanced accuracy / defect recall (no churn for a model that is merely as good).
    require_improvement: bool = False
    # Also compare defect recall at matched FRR when both metric dicts carry it (see the module docs).
    compare_at_matched_frr: bool = True


class GateDecision(BaseModel):
    """The verdict, every reason behind it (passes included, for the audit trail) and metric deltas."""

    promote: bool
    reasons: list[str]
    deltas: dict[str, float] = Field(default_factory=dict)  # challenger - champion

    def summary(self) -> str:
        """One line for logs and the registry history."""
        return ("promote" if self.promote else "reject") + ": " + "; ".join(self.reasons)


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    """A finite number in [0, 1], or None when missing, null, non-numeric or out of range."""
    v = metrics.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) and 0.0 <= v <= 1.0 else None


def _required(cfg: GateConfig) -> tuple[str, ...]:
    return REQUIRED_METRICS + ((FRR_METRIC,) if cfg.tolerance_false_reject_rate is not None else ())


def _check_present(metrics: dict[str, Any], who: str, cfg: GateConfig) -> list[str]:
    problems = []
    for key in _required(cfg):
        if _metric(metrics, key) is None:
            problems.append(f"{who} metric {key} is missing, null or not a number in [0, 1] "
                            f"(got {metrics.get(key)!r})")
    n = metrics.get("n_images")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        problems.append(f"{who} n_images must be a positive integer (got {n!r})")
    return problems


def _same_set_problems(challenger: dict[str, Any], champion: dict[str, Any]) -> list[str]:
    problems = []
    for key in SAME_SET_STRICT + SAME_SET_IF_PRESENT:
        a, b = challenger.get(key), champion.get(key)
        if a is None and b is None:
            if key == "n_images":
                problems.append("n_images missing: cannot confirm both models were scored on the same "
                                "evaluation set")
            continue
        if a is None or b is None:
            if key in SAME_SET_IF_PRESENT:
                continue
            who = "challenger" if b is None else "champion"
            problems.append(f"{key} present only for the {who}: cannot confirm the same evaluation set")
        elif a != b:
            problems.append(f"evaluation sets differ: {key} {a!r} (challenger) vs {b!r} (champion)")
    return problems


def decide(challenger: dict[str, Any], champion: dict[str, Any] | None, cfg: GateConfig | None = None
           ) -> GateDecision:
    """Promote or not, with reasons. ``champion`` None (first model of a line) promotes a valid challenger."""
    cfg = cfg or GateConfig()
    if not isinstance(challenger, dict) or (champion is not None and not isinstance(champion, dict)):
        raise TypeError("decide() takes metric dicts (as produced by evaluation)")
    problems = _check_present(challenger, "challenger", cfg)
    if champion is None:
        if problems:
            return GateDecision(promote=False, reasons=problems)
        return GateDecision(promote=True, reasons=["no champion yet: the first valid model of the line is promoted"])

    problems += _check_present(champion, "champion", cfg)
    problems += _same_set_problems(challenger, champion)
    if problems:
        return GateDecision(promote=False, reasons=problems)

    promote, reasons, deltas = True, [], {}
    improved = False
    checks = [("balanced_accuracy", cfg.tolerance_balanced_accuracy, +1)]
    matched = (cfg.compare_at_matched_frr and _metric(challenger, MATCHED_RECALL) is not None
               and _metric(champion, MATCHED_RECALL) is not None)
    if matched:
        checks.append((MATCHED_RECALL, cfg.tolerance_defect_recall, +1))
    frr_new, frr_old = _metric(challenger, FRR_METRIC), _metric(champion, FRR_METRIC)
    frr_tol = cfg.tolerance_false_reject_rate if cfg.tolerance_false_reject_rate is not None else 0.0
    if matched and frr_new is not None and frr_old is not None and frr_new < frr_old - frr_tol - _EPS:
        reasons.append(f"defect_recall_at_frr {float(challenger['defect_recall_at_frr']):.4f} vs "
                       f"{float(champion['defect_recall_at_frr']):.4f} not compared: the challenger's threshold "
                       f"rejects fewer good parts ({FRR_METRIC} {frr_new:.4f} vs {frr_old:.4f}); recall is "
                       f"compared at matched FRR instead")
    else:
        checks.append(("defect_recall_at_frr", cfg.tolerance_defect_recall, +1))
    if cfg.tolerance_false_reject_rate is not None:
        checks.append((FRR_METRIC, cfg.tolerance_false_reject_rate, -1))  # lower is better
    for key, tol, sign in checks:
        new, old = float(challenger[key]), float(champion[key])  # validated by _check_present
        delta = new - old
        deltas[key] = delta
        worse_by = -sign * delta  # > 0 means the challenger is worse
        desc = f"{key} {new:.4f} vs {old:.4f} ({delta:+.4f})"
        if worse_by > tol + _EPS:
            promote = False
            reasons.append(f"{desc}: regresses beyond tolerance {tol:g}")
        else:
            reasons.append(f"{desc}: within tolerance {tol:g}")
        if sign > 0 and delta > _EPS:
            improved = True
    if cfg.require_improvement and not improved:
        promote = False
        reasons.append("require_improvement: the challenger beats the champion on neither balanced accuracy "
                       "nor defect recall")
    return GateDecision(promote=promote, reasons=reasons, deltas=deltas)
