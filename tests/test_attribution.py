"""The attribution code credit and market share: integrated gradients, top contributions and
permutation importance, each against a hand-computed reference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from finpipe.attribution import integrated_gradients, permutation_importance, top_contributions


def test_integrated_gradients_of_a_quadratic_are_exact_for_windows_in_chunks():
    """For f(x) = sum(w * x**2) from a zero reference the attribution of element j is
    w_j * x_j**2 exactly (the gradient is linear along the path, which the midpoint rule
    integrates without error), for [N, L, F] windows split over several passes."""
    rng = np.random.default_rng(0)
    weights = torch.from_numpy(rng.normal(size=(4, 3))).float()
    inputs = torch.from_numpy(rng.normal(size=(11, 4, 3))).float()

    def forward(x: torch.Tensor) -> torch.Tensor:
        return (weights * x**2).sum(dim=(1, 2))

    attributions = integrated_gradients(
        forward, inputs, torch.zeros(4, 3), steps=5, rows_per_pass=4
    )
    assert attributions.shape == (11, 4, 3)
    np.testing.assert_allclose(attributions, (weights * inputs**2).numpy(), rtol=1e-5, atol=1e-6)


def test_integrated_gradients_from_a_reference_add_up_to_the_output_gap():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).eval()
    inputs, reference = torch.randn(9, 5), torch.randn(5)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return net(x).squeeze(-1)

    attributions = integrated_gradients(forward, inputs, reference, steps=64)
    with torch.no_grad():
        gap = (forward(inputs) - forward(reference[None])).numpy()
    np.testing.assert_allclose(attributions.sum(axis=1), gap, atol=1e-3)
    with pytest.raises(ValueError, match="at least one step"):
        integrated_gradients(forward, inputs, reference, steps=0)


def test_top_contributions_by_value_and_by_magnitude():
    attributions = np.array([[0.5, -0.9, 0.1, 0.0], [0.0, 0.0, 0.0, -0.2], [0.3, 0.3, -0.1, 0.2]])
    order, top, shown = top_contributions(attributions, 3, positive_only=True)
    assert order.tolist() == [[0, 2, 3], [0, 1, 2], [0, 1, 3]]  # ties keep feature order
    assert shown.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    order, top, shown = top_contributions(attributions, 3, positive_only=False)
    assert order.tolist() == [[1, 0, 2], [3, 0, 1], [0, 1, 3]]
    assert top[0].tolist() == [-0.9, 0.5, 0.1]  # the sign is kept
    assert shown.tolist() == [[True, True, True], [True, False, False], [True, True, True]]
    assert top_contributions(attributions[:, :2], 3, positive_only=False)[0].shape == (3, 2)


def test_top_contributions_keep_the_features_order_among_ties_on_many_features():
    """17 features (the market's): numpy's default sort is not stable past 16 values."""
    row = np.zeros((1, 17))
    row[0, [2, 5, 9, 11, 16]] = 0.25
    assert top_contributions(row, 3, positive_only=False)[0].tolist() == [[2, 5, 9]]
    attributions = np.random.default_rng(0).integers(-2, 3, size=(200, 17)).astype(float)
    for positive_only in (True, False):
        order, _, _ = top_contributions(attributions, 3, positive_only=positive_only)
        for values, chosen in zip(attributions, order, strict=True):
            size = values if positive_only else np.abs(values)
            by_hand = sorted(range(17), key=lambda j: (-size[j], j))[:3]  # larger, then earlier
            assert chosen.tolist() == by_hand, values


def test_permutation_importance_within_dates_on_a_frame_sorted_by_ticker():
    """Rows in any order: each date's values are shuffled among that date's rows only."""
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {
            "date": np.tile(pd.bdate_range("2024-01-01", periods=30), 20),
            "ticker": np.repeat([f"T{k:02d}" for k in range(20)], 30),
            "used": rng.normal(size=600),
        }
    )
    seen = {}

    def score(shuffled: pd.DataFrame, shuffle) -> float:
        seen[shuffle] = shuffled["used"]
        return 0.0

    permutation_importance(score, frame, ["used"], within="date", seed=4)
    shuffled = seen[("used", 0)]
    assert not shuffled.equals(frame["used"])
    for day, rows in frame.groupby("date").groups.items():
        assert sorted(shuffled[rows]) == sorted(frame.loc[rows, "used"]), day


def test_permutation_importance_shuffles_within_dates_and_finds_the_used_column():
    rng = np.random.default_rng(1)
    frame = pd.DataFrame(
        {
            "date": np.repeat(pd.bdate_range("2024-01-01", periods=30), 20),
            "used": rng.normal(size=600),
            "unused": rng.normal(size=600),
        }
    )
    frame["target"] = frame["used"] + 0.5 * rng.normal(size=600)
    seen: list[pd.DataFrame] = []
    shuffles = []

    def score(shuffled: pd.DataFrame, shuffle) -> float:
        seen.append(shuffled)
        shuffles.append(shuffle)
        return float(np.corrcoef(shuffled["used"], shuffled["target"])[0, 1])

    table = permutation_importance(score, frame, ["unused", "used"], within="date", seed=4)
    assert table["feature"].tolist() == ["used", "unused"]  # largest drop first
    baseline = np.corrcoef(frame["used"], frame["target"])[0, 1]
    assert (table["baseline"] == baseline).all()
    assert table.set_index("feature").loc["unused", "importance"] == 0.0  # never read
    assert table.set_index("feature").loc["used", "importance"] > 0.7
    assert shuffles == [None, ("unused", 0), ("used", 0)]
    shuffled = seen[2]["used"]
    assert not shuffled.equals(frame["used"])
    for day, rows in frame.groupby("date").groups.items():  # each date keeps its own values
        assert sorted(shuffled[rows]) == sorted(frame.loc[rows, "used"]), day
    again = permutation_importance(score, frame, ["unused", "used"], within="date", seed=4)
    pd.testing.assert_frame_equal(again, table)  # seeded
