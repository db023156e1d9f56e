"""Champion/challenger promotion: the policy, the sanity gate and the registry update.

A new model version becomes `challenger`; it becomes `champion` only if it beats the current
champion on the same evaluation window, scored by the same code. The decision, both figures and
what both models were judged on are logged to the training run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient

from finpipe.errors import ConfigError, ModelRejected
from finpipe.faults import crash_point
from finpipe.locks import DEFAULT_TIMEOUT_SECONDS, champion_lock
from finpipe.settings import Settings
from finpipe.text import counted
from finpipe.tracking import (
    AS_OF_TAG,
    CHALLENGER,
    CHAMPION,
    PROMOTION_REASON_TAG,
    PROMOTION_TAG,
    QUALITY_FLOOR_TAG,
    RegisteredModel,
    current_alias_version,
    load_model_version,
    owner_tags,
    set_alias,
    version_tags,
)


def check_predictions_sane(predictions, what: str) -> None:
    """Raise ModelRejected if predictions are empty, NaN/inf or constant: never promote those."""
    values = np.asarray(predictions, dtype=float)
    if values.size == 0 or not np.isfinite(values).all():
        raise ModelRejected(f"{what}: predictions are empty or contain NaN/inf; not registered")
    if np.std(values) < 1e-12:
        raise ModelRejected(f"{what}: predictions are constant; not registered")


def best_on_validation(results: dict[str, dict], metric: str) -> str:
    """Return the key of the result with the highest validation `metric` (NaN counts lowest).

    Raises ConfigError naming the metrics there are when a result has no `metric` (a
    domain's `selection_metric` misspelt)."""
    lacking = sorted(kind for kind in results if metric not in results[kind]["validation"])
    if lacking:
        known = sorted(results[lacking[0]]["validation"])
        raise ConfigError(
            f"selection metric {metric!r} is not among the validation metrics of "
            f"{', '.join(lacking)}: {', '.join(known) or 'none'}"
        )

    def score(kind: str) -> float:
        value = results[kind]["validation"][metric]
        return -np.inf if value is None or np.isnan(value) else value

    return max(results, key=score)


def register_challenger(
    settings: Settings, domain: str, model_uri: str, candidate: str, as_of: str
) -> str:
    """Register the model logged at `model_uri` as a new version tagged with the as-of date it
    was trained at, point `challenger` at it and tag the active run; return the version.

    A crash between registering and aliasing leaves an unaliased version that nothing reads
    (the champion is untouched); the re-run registers a fresh one.
    """
    name = settings.model_name(domain)
    version = str(mlflow.register_model(model_uri, name, tags={AS_OF_TAG: as_of}).version)
    crash_point("model-registered")
    set_alias(settings, domain, CHALLENGER, version)
    mlflow.set_tags({"candidate": candidate, "challenger_version": version})
    return version


@dataclass(frozen=True)
class ComparedOn:
    """What both models were judged on: `kept` of the night's `total` test rows, counted in the
    domain's `unit` (e.g. "test date"); the others were left out for both because the champion
    learnt from them (`lifecycle.rows_the_champion_never_learnt`)."""

    kept: int
    total: int
    unit: str

    def describe(self, champion_version: str | None) -> str:
        """Return e.g. "16 of 94 test dates (78 left out: champion v1 learnt from them)", or
        "94 test dates" when none was left out."""
        if self.kept == self.total:
            return counted(self.total, self.unit)
        return (
            f"{self.kept:,} of {counted(self.total, self.unit)} ({self.total - self.kept:,} "
            f"left out: champion v{champion_version} learnt from them)"
        )


@dataclass(frozen=True)
class PromotionDecision:
    """The champion/challenger decision and the figures behind it."""

    promoted: bool
    metric: str
    challenger_version: str
    challenger_score: float
    champion_version: str | None
    champion_score: float | None
    reason: str
    floor_refused: bool = False  # the quality floor refused the challenger: neither was scored
    compared_on: ComparedOn | None = None  # None: the domain's scorer does not say

    def to_dict(self) -> dict:
        return asdict(self)


def decide_promotion(
    *,
    metric: str,
    challenger_version: str,
    challenger_score: float,
    champion_version: str | None,
    champion_score: float | None,
    min_improvement: float = 0.0,
    compared_on: ComparedOn | None = None,
) -> PromotionDecision:
    """Return whether the challenger should become champion (higher `metric` is better).

    A challenger whose score is not a number (NaN, or -inf: it could not score the window) is
    never promoted, not even as the first model. Otherwise the first model is promoted, and
    afterwards the challenger must beat the champion, measured on the same evaluation window,
    by more than `min_improvement`; a champion that cannot be measured there (its score NaN or
    -inf: it no longer reads today's features) gives way to one that can. The reason says what
    both were judged on when `compared_on` is given (e.g. "on the same 16 of 94 test dates (78
    left out: champion v1 learnt from them)"), "on the same test window" otherwise.
    """

    def decision(promoted: bool, reason: str) -> PromotionDecision:
        return PromotionDecision(
            promoted,
            metric,
            challenger_version,
            challenger_score,
            champion_version,
            champion_score,
            reason,
            compared_on=compared_on,
        )

    challenger = f"challenger v{challenger_version} {metric}={_figure(challenger_score)}"
    champion = f"champion v{champion_version}"
    window, same = "the test window", "the same test window"
    if compared_on is not None:
        window = compared_on.describe(champion_version)
        same = f"the same {window}"
    if not np.isfinite(challenger_score):
        kept = f"{champion} kept" if champion_version is not None else "there is no champion"
        return decision(False, f"{challenger}: it cannot be measured on {window}; {kept}")
    if champion_version is None or champion_score is None:
        return decision(True, "promoted as the first model (no champion before it)")
    champion += f" {metric}={_figure(champion_score)}"
    if not np.isfinite(champion_score):
        return decision(
            True, f"{champion}: it cannot be measured on {window}; {challenger} replaces it"
        )
    better = challenger_score > champion_score + min_improvement
    verb = "beats" if better else "does not beat"
    return decision(better, f"{challenger} {verb} {champion} on {same}")


def _figure(score: float) -> str:
    return "NaN" if np.isnan(score) else f"{score:.4f}"  # -inf: it could not score the window


def apply_promotion(settings: Settings, domain: str, decision: PromotionDecision) -> None:
    """Move `champion` to the challenger if promoted, and tag the version with the decision.

    Moving an alias is a single registry update, so `champion` always names a version.
    """
    crash_point("champion-alias")
    if decision.promoted:
        name = settings.model_name(domain)
        MlflowClient().set_registered_model_alias(name, CHAMPION, decision.challenger_version)
    _tag_version(settings, domain, decision)


def _tag_version(settings: Settings, domain: str, decision: PromotionDecision) -> None:
    """Tag the challenger's version with the decision (`promotion`: promoted or kept) and its
    reason in words, whether it was scored or refused before (the quality floor, a newer
    champion): the registry's page of the version, and `finpipe status`, say why."""
    client, name = MlflowClient(), settings.model_name(domain)
    outcome = "promoted" if decision.promoted else "kept"
    client.set_model_version_tag(name, decision.challenger_version, PROMOTION_TAG, outcome)
    client.set_model_version_tag(
        name, decision.challenger_version, PROMOTION_REASON_TAG, decision.reason
    )


def promote_challenger(
    settings: Settings,
    domain: str,
    *,
    challenger_version: str,
    metric: str,
    evaluate: Callable[[RegisteredModel], float],
    compared_on: Callable[[], ComparedOn] | None = None,
    run_id: str | None = None,
    lock_root: str | Path,
    lock_timeout: float = DEFAULT_TIMEOUT_SECONDS,
    on_wait: Callable[[str], None] | None = None,
) -> PromotionDecision:
    """Score challenger and current champion with `evaluate`; promote the challenger if better.

    `evaluate` receives a registered model and returns its score on the evaluation window
    (higher is better); both models go through it, so the comparison is like for like.
    `compared_on`, when given, says after both were scored what they were judged on, for the
    decision's reason (how many test rows, and how many were left out for both). One
    promotion of a domain at a time, under its champion lock in the store at `lock_root`
    (`finpipe.locks.champion_lock`): two nights' challengers promoted at once would each be
    compared with the same champion, and the later alias move would win, even for the older
    model; the second now waits (up to `lock_timeout` seconds, saying so through `on_wait`:
    LockTimeout after), then compares its challenger with the champion the first left.
    """
    holder = f"promotion of {domain} v{challenger_version}"
    with champion_lock(lock_root, domain, holder=holder, timeout=lock_timeout, on_wait=on_wait):
        return _promote(settings, domain, challenger_version, metric, evaluate, compared_on, run_id)


def _promote(
    settings: Settings,
    domain: str,
    challenger_version: str,
    metric: str,
    evaluate: Callable[[RegisteredModel], float],
    compared_on: Callable[[], ComparedOn] | None,
    run_id: str | None,
) -> PromotionDecision:
    champion_version = current_alias_version(settings, domain, CHAMPION)
    challenger_tags = version_tags(settings, domain, challenger_version)
    refusal = challenger_tags.get(QUALITY_FLOOR_TAG)
    if refusal:
        decision = refused_by_floor(metric, str(challenger_version), champion_version, refusal)
        _tag_version(settings, domain, decision)
        _log_decision(decision, run_id, {"promoted": 0.0})
        return decision
    if champion_version is not None and str(champion_version) == str(challenger_version):
        decision = _champion_already(settings, domain, metric, str(challenger_version), evaluate)
        _tag_version(settings, domain, decision)  # the alias is where it should be
        _log_decision(decision, run_id, {"challenger_score": decision.challenger_score})
        return decision
    if champion_version is not None:
        newer = newer_champion(
            metric,
            str(challenger_version),
            challenger_tags.get(AS_OF_TAG),
            champion_version,
            version_tags(settings, domain, champion_version).get(AS_OF_TAG),
        )
        if newer is not None:
            _tag_version(settings, domain, newer)
            _log_decision(newer, run_id, {"promoted": 0.0})
            return newer
    challenger = load_model_version(settings, domain, version=challenger_version)
    challenger_score = evaluate(challenger)
    champion_score = None
    if champion_version is not None:
        champion_score = evaluate(load_model_version(settings, domain, version=champion_version))
    decision = decide_promotion(
        metric=metric,
        challenger_version=str(challenger_version),
        challenger_score=challenger_score,
        champion_version=champion_version,
        champion_score=champion_score,
        compared_on=compared_on() if compared_on is not None else None,
    )
    apply_promotion(settings, domain, decision)
    figures = {"challenger_score": challenger_score, "promoted": float(decision.promoted)}
    if champion_score is not None and np.isfinite(champion_score):
        figures["champion_score"] = champion_score
    if decision.compared_on is not None:  # in the unit the reason names, e.g. test dates
        compared = decision.compared_on
        figures["promotion_compared"] = float(compared.kept)
        figures["promotion_left_out"] = float(compared.total - compared.kept)
    _log_decision(decision, run_id, figures)
    return decision


def _champion_already(
    settings: Settings,
    domain: str,
    metric: str,
    version: str,
    evaluate: Callable[[RegisteredModel], float],
) -> PromotionDecision:
    """The decision of a promotion tried again after its alias move went through (the promote
    task retries a server's fault, e.g. one while the decision was logged): the challenger is
    champion, so it stays promoted rather than tying with itself and being tagged `kept`."""
    score = evaluate(load_model_version(settings, domain, version=version))
    reason = (
        f"challenger v{version} is champion already: an earlier try of this promotion moved "
        "the alias"
    )
    return PromotionDecision(True, metric, version, score, version, score, reason)


def newer_champion(
    metric: str,
    challenger_version: str,
    challenger_as_of: str | None,
    champion_version: str,
    champion_as_of: str | None,
) -> PromotionDecision | None:
    """The decision when the champion was trained as of a later date than the challenger (a
    re-run of an earlier night): the champion's training rows may reach into the challenger's
    test window, so no comparison there is fair and the champion stays. None otherwise, or
    when either version predates the as-of tag."""
    if not challenger_as_of or not champion_as_of or champion_as_of <= challenger_as_of:
        return None
    return _unscored(
        metric,
        challenger_version,
        champion_version,
        f"champion v{champion_version} was trained as of {champion_as_of}, after challenger "
        f"v{challenger_version}'s {challenger_as_of}: it may have learnt from the challenger's "
        f"test window, so no comparison there is fair; champion v{champion_version} kept "
        f"(train as of {champion_as_of} or later to challenge it)",
    )


def refused_by_floor(
    metric: str, challenger_version: str, champion_version: str | None, refusal: str
) -> PromotionDecision:
    """The decision for a challenger the quality floor refused: it never becomes champion."""
    kept = f"champion v{champion_version} kept" if champion_version else "there is no champion"
    return _unscored(
        metric,
        challenger_version,
        champion_version,
        f"challenger v{challenger_version} refused by the quality floor ({refusal}); {kept}",
        floor_refused=True,
    )


def _unscored(
    metric: str,
    challenger_version: str,
    champion_version: str | None,
    reason: str,
    *,
    floor_refused: bool = False,
) -> PromotionDecision:
    """A decision to keep the champion taken before either model was scored."""
    return PromotionDecision(
        promoted=False,
        metric=metric,
        challenger_version=challenger_version,
        challenger_score=float("nan"),
        champion_version=champion_version,
        champion_score=None,
        reason=reason,
        floor_refused=floor_refused,
    )


def _log_decision(
    decision: PromotionDecision, run_id: str | None, figures: Mapping[str, float]
) -> None:
    if run_id is None:
        return
    with mlflow.start_run(run_id=run_id, tags=owner_tags()):  # resumed: this process owns it now
        mlflow.log_dict(decision.to_dict(), "promotion.json")
        mlflow.log_metrics(dict(figures))
        mlflow.set_tag(PROMOTION_REASON_TAG, decision.reason)  # the run's page says why
        if decision.promoted:
            tag = "promoted"
        elif decision.floor_refused:
            tag = "refused by the quality floor"
        else:
            tag = "champion kept"
        mlflow.set_tag("promotion", tag)
