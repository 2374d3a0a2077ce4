"""The promotion gate: a new model version becomes the serving default only if, on the same evaluation
report, it is not worse than the current default by more than the tolerances, in test AUC and in replayed
revenue (SNIPS RPM). Otherwise it is kept, not promoted, and the decision says why."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class PromotionGate:
    auc_tolerance: float = 0.002  # AUC the new version may lose (absolute)
    rpm_tolerance: float = 0.02  # SNIPS RPM it may lose (relative)


@dataclass
class Decision:
    candidate: str  # name/version
    current: str | None  # the serving default it is compared with (None: there is none yet)
    promote: bool
    reasons: list[str] = field(default_factory=list)
    gate: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _rpm(report: dict, key: str) -> float | None:
    revenue = report.get("revenue") or {}
    policy = revenue.get("policies", {}).get(key)
    return policy["snips"]["rpm"] if policy else None


def _defined(value) -> bool:
    return value is not None and math.isfinite(value)


def decide(report: dict, candidate: str, current: str | None, gate: PromotionGate = PromotionGate()) -> Decision:
    """Whether `candidate` may replace `current` (keys of the report's models, e.g. "fin/3")."""
    decision = Decision(candidate, current, promote=True, gate=asdict(gate))
    models = report.get("models", {})
    missing = [k for k in (candidate, current) if k is not None and k not in models]
    if missing:
        raise ValueError(f"the evaluation report has no {' or '.join(missing)}: evaluate both versions together")
    auc_new = models[candidate]["auc"]
    if not _defined(auc_new):  # (a report file holds an undefined AUC as null); also with no default yet
        decision.promote = False
        decision.reasons.append(f"{candidate}'s AUC is undefined ({auc_new}): its scores or the labels are unusable")
        return decision
    if current is None or current == candidate:
        decision.reasons.append("no other version is the default yet" if current is None else "already the default")
        return decision
    auc_old = models[current]["auc"]
    if not _defined(auc_old):
        decision.reasons.append(f"{current}'s AUC is undefined ({auc_old}): AUC not compared")
    elif auc_new < auc_old - gate.auc_tolerance:
        decision.promote = False
        decision.reasons.append(f"AUC {auc_new:.4f} is below {current}'s {auc_old:.4f} by more than "
                                f"{gate.auc_tolerance}")
    else:
        decision.reasons.append(f"AUC {auc_new:.4f} vs {auc_old:.4f}: within {gate.auc_tolerance}")
    rpm_new, rpm_old = _rpm(report, candidate), _rpm(report, current)
    if rpm_new is None or rpm_old is None:
        decision.reasons.append("no revenue replay in the report: RPM not checked")
    elif not (_defined(rpm_new) and _defined(rpm_old)):
        decision.promote = decision.promote and _defined(rpm_new)
        decision.reasons.append(f"SNIPS RPM {rpm_new} vs {rpm_old}: undefined, "
                                + ("not compared" if _defined(rpm_new) else f"{candidate} not promoted"))
    elif rpm_new < rpm_old * (1 - gate.rpm_tolerance):
        decision.promote = False
        decision.reasons.append(f"SNIPS RPM {rpm_new:.1f} is below {current}'s {rpm_old:.1f} by more than "
                                f"{100 * gate.rpm_tolerance:g}%")
    else:
        decision.reasons.append(f"SNIPS RPM {rpm_new:.1f} vs {rpm_old:.1f}: within {100 * gate.rpm_tolerance:g}%")
    return decision
