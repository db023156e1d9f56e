"""Why a model scored as it did, for every domain: per-row attributions and global importance.

- `integrated_gradients` (Sundararajan et al., 2017): the attribution of input element j of a
  row is (x_j - reference_j) times the mean gradient of the output along the straight path from
  the reference to the row (midpoint rule, `steps` points). Attributions of a row add up to
  output(row) - output(reference), up to the midpoint rule's error. Credit explains the
  calibrated log-odds of default from the typical applicant; market explains a net's score from
  the training-mean input (zero after scaling), over the whole lookback window for a sequence
  model.
- `top_contributions`: each row's largest attributions, by value (credit's reasons PD is higher
  than the typical applicant's) or by magnitude (market: what moved the score either way).
- `permutation_importance`: how much a model's score drops when one input column is shuffled
  (Breiman, 2001), here within groups (e.g. across tickers within each date), so a feature's
  time pattern survives and only its link to the row is broken.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch


def integrated_gradients(
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    reference: torch.Tensor,
    *,
    steps: int = 32,
    rows_per_pass: int = 512,
) -> np.ndarray:
    """Return the integrated-gradient attribution of every element of `inputs` [N, ...].

    `forward` maps a batch [B, ...] to one output per row [B] (the caller puts the net in eval
    mode); `reference` is broadcast against each row. Every step of the path for
    `rows_per_pass` rows goes through `forward` as one batch (steps x rows points, one backward
    pass), not one small batch per step. The result has the shape of `inputs`.
    """
    if steps < 1:
        raise ValueError(f"integrated gradients need at least one step, got {steps}")
    shape = tuple(inputs.shape[1:])
    alphas = ((torch.arange(steps, dtype=inputs.dtype) + 0.5) / steps).reshape(
        steps, 1, *([1] * len(shape))
    )
    parts = [np.zeros((0, *shape), dtype=np.float32)]
    with torch.enable_grad():
        for start in range(0, len(inputs), rows_per_pass):
            part = inputs[start : start + rows_per_pass].detach()
            delta = part - reference
            points = (reference + alphas * delta).reshape(-1, *shape).requires_grad_(True)
            (gradient,) = torch.autograd.grad(forward(points).sum(), points)
            gradient_sum = gradient.reshape(steps, len(part), *shape).sum(dim=0)
            parts.append((delta * gradient_sum / steps).numpy())
    return np.concatenate(parts)


def top_contributions(
    attributions: np.ndarray, k: int, *, positive_only: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (feature index, attribution, shown), each [N, k], of each row's `k` largest
    contributions in `attributions` [N, features].

    With `positive_only`, the largest values, and `shown` is False where a value is not above
    zero (fewer than `k` features pushed the output up); otherwise the largest magnitudes,
    sign kept, and `shown` is False only where an attribution is exactly zero. Ties keep the
    features' order.
    """
    k = min(k, attributions.shape[1])
    key = -attributions if positive_only else -np.abs(attributions)
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(attributions, order, axis=1)
    shown = top > 0 if positive_only else top != 0
    return order, top, shown


Shuffle = tuple[str, int]  # (column, repeat): which shuffle a frame given to `score` carries


def permutation_importance(
    score: Callable[[pd.DataFrame, Shuffle | None], float],
    frame: pd.DataFrame,
    columns: Sequence[str],
    *,
    within: str | None = None,
    repeats: int = 1,
    seed: int = 0,
) -> pd.DataFrame:
    """Return `feature`, `importance`, `score`: the drop of `score(frame)` when each column is
    shuffled (the mean over `repeats` shuffles), largest drop first.

    `score(frame, shuffle)` maps a frame to one number, higher better (e.g. the IC of a model's
    predictions on it); `shuffle` says which shuffle the frame carries, (column, repeat), or
    None for `frame` itself, so a caller scoring several models on the same shuffles may reuse
    work by it. With `within`, values are shuffled among the rows sharing that column's value
    (a date: across tickers on the same day). The same frame, columns and `seed` give the same
    shuffles for every model, so their importances compare like for like. A negative
    importance means the shuffled column scored better: the model does not use it, within
    noise.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    baseline = float(score(frame, None))
    rng = np.random.default_rng(seed)
    if within is None:
        groups = np.zeros(len(frame), dtype=np.int64)
    else:
        groups = pd.factorize(frame[within], sort=True)[0]
    by_group = np.argsort(groups, kind="stable")  # row positions grouped, original order
    rows = []
    for column in columns:
        scores = []
        for repeat in range(repeats):
            shuffled_order = np.lexsort((rng.random(len(frame)), groups))  # grouped, shuffled
            values = frame[column].to_numpy(copy=True)
            values[by_group] = values[shuffled_order]
            scores.append(float(score(frame.assign(**{column: values}), (column, repeat))))
        mean = float(np.mean(scores))
        rows.append({"feature": column, "importance": baseline - mean, "score": mean})
    table = pd.DataFrame(rows, columns=["feature", "importance", "score"])
    table = table.sort_values("importance", ascending=False, kind="stable")
    return table.reset_index(drop=True).assign(baseline=baseline)
