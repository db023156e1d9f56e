"""The market ensemble: the nets of one training night combined into one model.

Each member's prediction is standardised across the tickers of each date (a cross-sectional
z-score: minus the date's mean, over the date's standard deviation, ddof 0; 0 on a date with
one ticker or no spread), so members trained on different scales weigh alike, and the ensemble
scores `sum_k w_k * z_k` with weights summing to one. Its predictions are scores in z units
for ranking tickers within a date, not returns.

The weights (`fit_ensemble`), fitted on the validation window only (the members never trained
on it; they only early-stopped on it):
- `mean`: equal weights, the average of the members' z-scores;
- `stacked`: non-negative least squares of the label's cross-sectional z-score on the members'
  z-scores, rescaled to sum to one.
Stacking is kept only if it beats the mean on validation out of sample: the validation dates
are cut in two halves, each half is scored with weights fitted on the other (less the
`horizon` dates next to it, whose labels overlap it), and the stacked weights must give a
higher mean daily IC over the whole window than the mean does. The validation IC the ensemble
competes with (`selection["validation_ic"]`) scores each half by the choice made, and the
weights fitted, on the other half (`_chosen_on_the_other_half`): picking it over a member is
decided neither by weights fitted on the dates it is judged on nor by the choice between the
mean and the stack, whose higher IC is biased upward (a maximum of two noisy figures). The
boosted trees enter the weighting with their cross-fitted validation predictions
(`FittedMarketBoostedTrees.cross_fitted_validation`), not their kept round's, which was chosen
on those dates: every caller (the nightly, the walk-forward backtest, the peer benchmark) gets
the same ensemble from the same members.

Saved as one model folder: `model.json` (weights, how they were chosen) and each member's own
folder under `members/<kind>/`, read back with `finpipe.market.candidates.load_member` (the
members may be nets or the boosted trees).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Self

import numpy as np
import pandas as pd

from finpipe.market.boosted import FittedMarketBoostedTrees
from finpipe.market.candidates import MarketMember, load_member
from finpipe.market.features import KEY_COLUMNS
from finpipe.market.model import reason_columns
from finpipe.metrics import per_date_ic
from finpipe.model_files import read_model_metadata, save_model_metadata

Combination = Literal["mean", "stacked"]
MEMBERS_FOLDER = "members"


def cross_sectional_zscore(values: np.ndarray, dates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (z, std): `values` standardised within each date (ddof 0) and the standard
    deviation each row was divided by (NaN where it was 0 or undefined, which gives z = 0)."""
    frame = pd.DataFrame({"date": dates, "value": values})
    by_date = frame.groupby("date", sort=False)["value"]
    mean = by_date.transform("mean").to_numpy()
    std = by_date.transform("std", ddof=0).to_numpy()
    std = np.where(np.isfinite(std) & (std > 0), std, np.nan)
    z = np.nan_to_num((values - mean) / std, nan=0.0)
    return z, std


@dataclass
class FittedMarketEnsemble:
    """Members (kind -> fitted net) and the weights their per-date z-scores are summed with."""

    saved_as: ClassVar[str] = "market ensemble"

    members: dict[str, MarketMember]
    weights: dict[str, float]
    combination: Combination
    label: str
    horizon: int
    selection: dict[str, float] = field(default_factory=dict)  # how the combination was chosen
    # the last date whose price its members' training or validation labels, or its own
    # validation labels, read (`finpipe.market.pipeline.learnt_through`); None: saved before
    # finpipe recorded it
    learnt_through: str | None = None

    @property
    def feature_columns(self) -> list[str]:
        """Every member's feature columns, each once, in the members' order."""
        return list(dict.fromkeys(c for m in self.members.values() for c in m.feature_columns))

    @property
    def history_rows(self) -> int:
        """Rows of a ticker's history the longest-sighted member reads, its own row included."""
        return max(member.history_rows for member in self.members.values())

    def member_predictions(
        self, features: pd.DataFrame, *, score_from: pd.Timestamp | None = None
    ) -> pd.DataFrame:
        """Return `date`, `ticker` and one column per member with its raw prediction, for the
        rows `predict` returns."""
        scored: pd.DataFrame | None = None
        for kind, member in self.members.items():
            predicted = member.predict(features, score_from=score_from)
            if scored is None:
                scored = predicted.rename(columns={"prediction": kind})
            else:
                scored[kind] = predicted["prediction"]
        assert scored is not None  # an ensemble has members (fit_ensemble, load)
        return scored

    def combine(self, scored: pd.DataFrame) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Return the ensemble score of each row of `member_predictions`' frame, and per member
        the standard deviation its prediction was divided by on the row's date."""
        dates = scored["date"].to_numpy()
        total = np.zeros(len(scored))
        spreads = {}
        for kind, weight in self.weights.items():
            z, spreads[kind] = cross_sectional_zscore(scored[kind].to_numpy(np.float64), dates)
            total += weight * z
        return total, spreads

    def predict(
        self, features: pd.DataFrame, *, score_from: pd.Timestamp | None = None
    ) -> pd.DataFrame:
        """Return `date`, `ticker`, `prediction` (the weighted sum of the members' per-date
        z-scores) for every row of `features`, or from `score_from` on (see
        `FittedMarketModel.predict`: earlier rows are window history only)."""
        scored = self.member_predictions(features, score_from=score_from)
        prediction, _ = self.combine(scored)
        return scored[["date", "ticker"]].assign(prediction=prediction)

    def explain(
        self, features: pd.DataFrame, *, score_from: pd.Timestamp | None = None
    ) -> pd.DataFrame:
        """Return `predict`'s rows with their three largest contributions (`reason_columns`).

        A feature's attribution is its members' (a net's integrated gradients, the trees'
        TreeSHAP values; prediction units) in the units the ensemble adds up: each member's
        divided by that member's spread on the date and weighted, `sum_k w_k * a_k / std_k(date)`.
        The per-date mean the z-score subtracts is common to every ticker of the date and
        attributes nothing, so a row's attributions add up to its score less the date's
        `sum_k w_k * (reference_k - mean_k(date)) / std_k(date)`, reference_k being what member
        k's add up from (a net's score of the training-mean input, the trees' expected value).
        """
        scored = self.member_predictions(features, score_from=score_from)
        prediction, spreads = self.combine(scored)
        columns = self.feature_columns
        attributions = np.zeros((len(scored), len(columns)))
        for kind, weight in self.weights.items():
            member = self.members[kind]
            own = member.attributions(features, score_from=score_from)
            scale = np.nan_to_num(weight / spreads[kind], nan=0.0)[:, None]
            positions = [columns.index(c) for c in member.feature_columns]
            attributions[:, positions] += own * scale
        reasons = reason_columns(columns, attributions, scored.index)
        explained = scored[["date", "ticker"]].assign(prediction=prediction)
        return pd.concat([explained, reasons], axis=1)

    def save(self, directory: Path) -> None:
        """Write each member's folder under `members/<kind>/`, then `model.json`."""
        directory = Path(directory)
        for kind, member in self.members.items():
            member.save(directory / MEMBERS_FOLDER / kind)
        save_model_metadata(
            directory,
            {
                "model": "ensemble",
                "members": list(self.members),
                "weights": self.weights,
                "combination": self.combination,
                "label": self.label,
                "horizon": self.horizon,
                "selection": self.selection,
                "learnt_through": self.learnt_through,
            },
        )

    @classmethod
    def load(cls, directory: Path) -> Self:
        """Read an ensemble written by `save` (members on CPU, in eval mode)."""
        directory = Path(directory)
        data = read_model_metadata(directory, cls.saved_as, with_weights=False)
        members = {
            kind: load_member(kind, directory / MEMBERS_FOLDER / kind) for kind in data["members"]
        }
        return cls(
            members=members,
            weights={kind: float(w) for kind, w in data["weights"].items()},
            combination=data["combination"],
            label=data["label"],
            horizon=int(data["horizon"]),
            selection={k: float(v) for k, v in data["selection"].items()},
            learnt_through=data.get("learnt_through"),  # absent from models saved before it
        )


def fit_ensemble(
    members: Mapping[str, MarketMember],
    scored: pd.DataFrame,
    validation_dates: pd.DatetimeIndex,
    *,
    label: str,
    horizon: int,
) -> FittedMarketEnsemble:
    """Return the ensemble of `members` with the weights chosen on the validation window (see
    the module docstring).

    `scored` holds `date`, `ticker`, `label` and one column per member with its prediction, for
    (at least) the validation dates; the trees' validation rows are replaced by their
    cross-fitted predictions where they have them. `selection` records the mean's validation
    IC, the cross-fitted stacked one (NaN when the window is too short to cut in two) and the
    validation IC the ensemble reports as its own.
    """
    kinds = list(members)
    if len(kinds) < 2:
        raise ValueError(f"an ensemble needs at least two members, got {kinds}")
    window = scored[scored["date"].isin(validation_dates)].dropna(subset=[label])
    window = _cross_fitted_where_known(window, members)
    window = window.sort_values("date", kind="stable").reset_index(drop=True)
    dates = window["date"].to_numpy()
    z = np.column_stack(
        [cross_sectional_zscore(window[k].to_numpy(np.float64), dates)[0] for k in kinds]
    )
    target, _ = cross_sectional_zscore(window[label].to_numpy(np.float64), dates)

    def ic(values: np.ndarray, rows: np.ndarray | slice = slice(None)) -> float:
        daily = per_date_ic(
            pd.DataFrame(
                {"date": dates[rows], "prediction": values, "label": window[label].to_numpy()[rows]}
            ),
            label="label",
        )
        return float(daily.mean()) if len(daily) else float("nan")

    equal = np.full(len(kinds), 1.0 / len(kinds))
    mean_ic = ic(z @ equal)
    crossfit = _cross_fitted(z, target, dates, horizon)
    crossfit_ic = ic(crossfit) if crossfit is not None else float("nan")
    stacked = _stacking_weights(z, target)
    stacks = _stacking_wins(mean_ic, crossfit_ic, stacked)
    weights = stacked if stacks and stacked is not None else equal
    # The IC the ensemble competes with: the higher of the mean's and the stacked weights'
    # validation IC is a maximum of two noisy figures, biased upward
    # (tests/test_market_ensemble.py measures both on noise).
    honest = _chosen_on_the_other_half(z, target, dates, horizon, ic)
    return FittedMarketEnsemble(
        members=dict(members),
        weights={kind: float(w) for kind, w in zip(kinds, weights, strict=True)},
        combination="stacked" if stacks else "mean",
        label=label,
        horizon=horizon,
        selection={
            "mean_validation_ic": mean_ic,
            "stacked_crossfit_validation_ic": crossfit_ic,
            "validation_ic": ic(honest) if honest is not None else mean_ic,
        },
    )


def _cross_fitted_where_known(
    scores: pd.DataFrame, members: Mapping[str, MarketMember]
) -> pd.DataFrame:
    """`scores` (one column of predictions per member) with the trees' rows replaced by their
    cross-fitted validation predictions.

    The trees' kept round is their highest validation IC; weighting and judging an ensemble on
    the kept round's predictions would hand it that selection. On 20 panels of pure-noise
    labels (mlp, lgbm and their ensemble), the ensemble's validation IC was +0.027 ± 0.007 with
    that and the choice between mean and stack both made on the dates it is judged on, and it
    won selection on 10 of them; -0.001 ± 0.007 and 4 of 20 with neither."""
    for kind, member in members.items():
        if not isinstance(member, FittedMarketBoostedTrees):
            continue
        cross = member.cross_fitted_validation
        if cross is None:  # a window of one date: nothing was cross-fitted
            continue
        known = scores[KEY_COLUMNS].merge(cross, on=KEY_COLUMNS, how="left")["prediction"]
        values = known.to_numpy(dtype=np.float64)
        scores = scores.assign(**{kind: np.where(np.isnan(values), scores[kind], values)})
    return scores


def _stacking_wins(mean_ic: float, crossfit_ic: float, stacked: np.ndarray | None) -> bool:
    """Whether stacked weights beat the mean out of sample. A win is a real one, not rounding:
    members that agree give the mean's IC to ~1e-16."""
    return stacked is not None and np.isfinite(crossfit_ic) and crossfit_ic > mean_ic + 1e-9


def _chosen_on_the_other_half(
    z: np.ndarray,
    target: np.ndarray,
    dates: np.ndarray,
    horizon: int,
    ic: Callable[[np.ndarray, np.ndarray], float],
) -> np.ndarray | None:
    """Return each row's ensemble score when its half of the dates is scored by the choice made
    on the other half (less the `horizon` dates next to it): the mean, or the stacked weights
    fitted there when they beat the mean there out of sample (`_cross_fitted` within that
    half). Its IC estimates the whole procedure, the choice included, on dates it did not see.
    None when a half is too short to cut in two again (about 4 x (horizon + 1) validation
    dates or fewer: the mean's IC is reported then, the lower of the two when stacking won)."""
    distinct = pd.unique(dates)
    half = len(distinct) // 2
    first = np.isin(dates, distinct[:half])
    first_fit = np.isin(dates, distinct[: half - horizon])
    second_fit = np.isin(dates, distinct[half + horizon :])
    equal = np.full(z.shape[1], 1.0 / z.shape[1])
    scores = np.zeros(len(z))
    for fit_rows, scored_rows in ((second_fit, first), (first_fit, ~first)):
        rows = np.flatnonzero(fit_rows)
        inner = _cross_fitted(z[rows], target[rows], dates[rows], horizon)
        if inner is None:
            return None
        stacked = _stacking_weights(z[rows], target[rows])
        stacks = _stacking_wins(ic(z[rows] @ equal, rows), ic(inner, rows), stacked)
        weights = stacked if stacks and stacked is not None else equal
        scores[scored_rows] = z[scored_rows] @ weights
    return scores


def _stacking_weights(z: np.ndarray, target: np.ndarray) -> np.ndarray | None:
    """Non-negative least-squares weights of `target` on the columns of `z`, summing to one;
    None when every weight is zero (no member helps)."""
    if len(z) == 0:
        return None
    from scipy.optimize import nnls  # here: a process that fits no ensemble skips its import

    weights, _ = nnls(z, target)
    total = float(weights.sum())
    return weights / total if total > 0 else None


def _cross_fitted(
    z: np.ndarray, target: np.ndarray, dates: np.ndarray, horizon: int
) -> np.ndarray | None:
    """Return each row's stacked score with weights fitted on the other half of the dates
    (less the `horizon` dates next to its own half); None when a half has too few dates."""
    distinct = pd.unique(dates)
    half = len(distinct) // 2
    if half <= horizon + 1:
        return None
    first = np.isin(dates, distinct[:half])
    first_fit = np.isin(dates, distinct[: half - horizon])  # away from the second half
    second_fit = np.isin(dates, distinct[half + horizon :])  # away from the first half
    scores = np.zeros(len(z))
    for fit_rows, scored_rows in ((second_fit, first), (first_fit, ~first)):
        weights = _stacking_weights(z[fit_rows], target[fit_rows])
        if weights is None:
            weights = np.full(z.shape[1], 1.0 / z.shape[1])
        scores[scored_rows] = z[scored_rows] @ weights
    return scores
