"""The segment model: planted segments recovered, ids that survive a retrain, save/load."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from finpipe.customers.features import BASE_FEATURES, LOG_SCALED, build_customer_features
from finpipe.customers.model import (
    FittedSegmentModel,
    SegmentModelParams,
    align_segment_ids,
    check_segments_sane,
    choose_k,
    evaluation_space,
    fit_block_scaler,
    fit_segment_model,
    model_inputs,
)
from finpipe.customers.synthetic import CustomersSyntheticConfig, generate_customer_transactions
from finpipe.errors import ModelRejected
from finpipe.training import sets_by_id


def test_alignment_restores_the_champions_ids():
    champion = np.array([7, 7, 7, 2, 2, 5, 5, 5, 5])
    renumbered = np.array([1, 1, 0, 2, 2, 0, 0, 0, 0])  # same groups, one customer moved
    ids = align_segment_ids(renumbered, champion, k=3)
    assert ids == [5, 7, 2]
    assert np.mean(np.asarray(ids)[renumbered] == champion) == 8 / 9


def test_alignment_gives_fresh_ids_to_new_segments_and_sizes_order_a_first_model():
    champion = np.array([0, 0, 0, 1, 1, 1])
    split = np.array([0, 0, 2, 1, 1, 1])  # segment 0 splits in two: one new segment
    assert align_segment_ids(split, champion, k=3) == [0, 1, 2]
    assert align_segment_ids(np.array([2, 0, 0, 1, 1, 1]), None, k=3) == [1, 0, 2]


def test_a_new_segment_never_takes_an_id_an_earlier_model_issued():
    """k went 3 -> 2 (id 2 retired), then back to 3: the new segment is not "2" again, which
    meant another group; nor does it take a champion id that is empty today."""
    champion = np.array([0, 0, 0, 1, 1, 1])  # the champion's lineage issued 0, 1 and 2
    split = np.array([0, 0, 2, 1, 1, 1])
    assert align_segment_ids(split, champion, k=3, next_id=3) == [0, 1, 3]
    assert align_segment_ids(split, champion, k=3, next_id=1) == [0, 1, 2]


def test_a_segment_sharing_no_customer_with_a_champion_segment_never_takes_its_id():
    """Champion segments 0 and 1 merge as segment 2 splits in two: the one-to-one matching
    pairs the smaller half of 2 with the champion's 1, whose customers it never held. That
    half is a new segment (fresh id 3), and id 1, now inside the merged segment, retires."""
    champion = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    clusters = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
    assert align_segment_ids(clusters, champion, k=3) == [0, 2, 3]
    assert align_segment_ids(clusters, champion, k=3, next_id=5) == [0, 2, 5]


def test_a_champion_sharing_no_customer_today_gives_every_segment_a_fresh_id():
    """None of today's customers has a champion segment (nothing to match): the segments are
    all new, numbered by size from the first id the lineage never issued, not from 0 again."""
    clusters = np.array([2, 0, 0, 1, 1, 1])
    assert align_segment_ids(clusters, np.array([], dtype=np.int64), k=3, next_id=4) == [5, 4, 6]
    assert align_segment_ids(clusters, None, k=3) == [1, 0, 2]  # a first model


def test_choose_k_keeps_the_champions_k_within_tolerance():
    scores = {2: 0.40, 3: 0.52, 4: 0.51, 5: 0.45}
    assert choose_k(scores, None, 0.02) == 3
    assert choose_k(scores, 4, 0.02) == 4
    assert choose_k(scores, 5, 0.02) == 3


def test_sets_by_id_are_stable_and_sized():
    ids = pd.Series([f"C{i:05d}" for i in range(20_000)], dtype="string")
    sets = sets_by_id(ids, 0.15, 0.2)
    shares = pd.Series(sets).value_counts(normalize=True)
    assert shares["test"] == pytest.approx(0.2, abs=0.01)
    assert shares["validation"] == pytest.approx(0.15, abs=0.01)
    reordered = sets_by_id(ids.iloc[::-1].reset_index(drop=True), 0.15, 0.2)
    assert (reordered[::-1] == sets).all()  # a customer's set depends on its id only


def test_sanity_gate_rejects_an_empty_segment():
    predicted = pd.DataFrame(
        {"customer_id": ["a", "b"], "segment": [0, 0], "distance_to_centroid": [0.1, 0.2]}
    )
    with pytest.raises(ModelRejected, match="only 1 of 2 segments"):
        check_segments_sane(predicted, 2, "test")
    with pytest.raises(ModelRejected, match="NaN"):
        check_segments_sane(predicted.assign(distance_to_centroid=np.nan), 1, "test")
    with pytest.raises(ModelRejected, match="NaN"):  # one customer's is enough
        check_segments_sane(predicted.assign(distance_to_centroid=[0.1, np.inf]), 1, "test")


@pytest.fixture(scope="module")
def two_days():
    """Snapshots of two consecutive days of a planted-segment log, and the planted labels."""
    generated = generate_customer_transactions(
        CustomersSyntheticConfig(customers=800, days=500, seed=3)
    )
    end = generated.transactions["date"].max()
    snapshots = [
        build_customer_features(generated.transactions, day, active_days=365)
        for day in (end - pd.Timedelta(days=1), end)
    ]
    return snapshots, generated.segments.set_index("customer_id")["segment"]


@pytest.fixture(scope="module")
def champion(two_days):
    (yesterday, _), _ = two_days
    sets = sets_by_id(yesterday["customer_id"], 0.15, 0.2)
    return fit_segment_model(yesterday, sets, SegmentModelParams())


def test_test_customers_take_no_part_in_fitting(two_days):
    """The log columns, scaler, autoencoder, k-means and the choice of k read the train and
    validation customers only: test customers with absurd values change none of them."""
    (yesterday, _), _ = two_days
    sets = sets_by_id(yesterday["customer_id"], 0.15, 0.2)
    test = sets == "test"
    distorted = yesterday.copy()
    for column in ("monetary_total", "monetary_mean", "frequency", "recency_days"):
        distorted.loc[test, column] = distorted.loc[test, column] * 1000 + 7
    distorted["category_share_only_in_test"] = np.where(test, 1.0, 0.0)  # a category too
    params = SegmentModelParams(max_epochs=3, kmeans_restarts=2, k_max=4)

    fitted = fit_segment_model(yesterday, sets, params)
    refitted = fit_segment_model(distorted, sets, params)
    assert test.sum() > 100
    assert refitted.feature_columns == fitted.feature_columns
    assert refitted.log_columns == fitted.log_columns
    assert refitted.scaler == fitted.scaler
    assert refitted.silhouette_by_k == fitted.silhouette_by_k
    np.testing.assert_array_equal(refitted.centroids, fitted.centroids)
    kept = yesterday[~test]
    np.testing.assert_array_equal(refitted.embed(kept), fitted.embed(kept))


def test_planted_segments_are_recovered(two_days, champion):
    (yesterday, _), planted = two_days
    segments = champion.predict(yesterday)["segment"]
    truth = yesterday["customer_id"].map(planted)
    test = sets_by_id(yesterday["customer_id"], 0.15, 0.2) == "test"
    assert adjusted_rand_score(truth, segments) >= 0.8
    assert adjusted_rand_score(truth[test], segments[test]) >= 0.8
    assert set(champion.silhouette_by_k) == set(range(2, 9))
    assert champion.k == max(champion.silhouette_by_k, key=champion.silhouette_by_k.get)


@pytest.mark.parametrize("seed", [0, 1])
def test_retrain_on_the_next_day_keeps_segment_ids(two_days, champion, seed):
    """Tomorrow's model (even from another initialisation) keeps >= 90% of customers in the
    segment id they had today. The champion's ids are renumbered first (10, 11, ... in reverse
    size order, as after a history of retrains), so matching, not luck, must carry them over."""
    (yesterday, today), _ = two_days
    ids = champion.predict(yesterday)["segment"]
    renumber = {s: 10 + i for i, s in enumerate(ids.value_counts(ascending=True).index)}
    before = champion.predict(yesterday).set_index("customer_id")["segment"].map(renumber)
    on_champion = champion.predict(today).set_index("customer_id")["segment"].map(renumber)
    sets = sets_by_id(today["customer_id"], 0.15, 0.2)
    retrained = fit_segment_model(
        today,
        sets,
        SegmentModelParams(seed=seed),
        champion_segments=on_champion,
        champion_k=champion.k,
    )
    after = retrained.predict(today).set_index("customer_id")["segment"]
    both = after.index.intersection(before.index)
    assert len(both) >= 0.95 * len(after)
    kept = float(np.mean(after[both].to_numpy() == before[both].to_numpy()))
    assert kept >= 0.9
    assert adjusted_rand_score(before[both], after[both]) >= 0.8
    assert set(after) <= set(renumber.values()) | {10 + champion.k + i for i in range(4)}


def test_a_retrain_that_adds_a_segment_gives_it_an_id_no_earlier_model_issued(two_days, champion):
    """The champion's lineage issued ids up to 19 (ids it retired when k shrank are not in its
    segments today): the retrain's extra segment is 20, and the model records 21 as next."""
    (_, today), _ = two_days
    on_champion = champion.predict(today).set_index("customer_id")["segment"]
    params = SegmentModelParams(
        max_epochs=3, kmeans_restarts=2, k_min=champion.k + 1, k_max=champion.k + 1
    )
    sets = sets_by_id(today["customer_id"], 0.15, 0.2)
    retrained = fit_segment_model(
        today, sets, params, champion_segments=on_champion, champion_next_id=20
    )
    assert sorted(set(retrained.segment_ids) - set(on_champion)) == [20]
    assert retrained.next_id == 21
    assert champion.next_id == champion.k  # a first model: ids 0..k-1 issued


def test_save_and_load_give_the_same_segments(tmp_path, two_days, champion):
    (_, today), _ = two_days
    champion.save(tmp_path / "model")
    loaded = FittedSegmentModel.load(tmp_path / "model")
    pd.testing.assert_frame_equal(champion.predict(today), loaded.predict(today))
    assert loaded.silhouette_by_k == champion.silhouette_by_k
    assert loaded.next_id == champion.next_id
    # A category absent from a later snapshot is a share of 0, not an error...
    shares = [c for c in today.columns if c.startswith("category_share_")]
    without = today.drop(columns=shares[:1])
    expected = champion.predict(today.assign(**{shares[0]: 0.0}))
    pd.testing.assert_frame_equal(loaded.predict(without), expected)
    # ...but a missing behavioural feature is.
    with pytest.raises(ValueError, match=r"\['recency_days'\] missing"):
        loaded.predict(today.drop(columns=["recency_days"]))


def test_the_evaluation_space_is_standardised_with_the_training_customers_only():
    """Promotion compares silhouettes in a space scaled by the training customers' statistics:
    absurd values and a category of the test customers move none of them, so the train and
    validation customers keep their coordinates and the test ones are placed by them."""
    rng = np.random.default_rng(5)
    customers = 400
    snapshot = pd.DataFrame(
        {
            "customer_id": pd.array([f"c{i:03d}" for i in range(customers)], dtype="string"),
            **{name: rng.lognormal(2.0, 1.0, customers) for name in BASE_FEATURES},
            "category_share_books": rng.uniform(0, 1, customers),
        }
    )
    sets = sets_by_id(snapshot["customer_id"], 0.15, 0.2)
    test = sets == "test"
    distorted = snapshot.copy()
    distorted.loc[test, ["monetary_total", "recency_days"]] *= 1000.0
    distorted["category_share_only_in_test"] = np.where(test, 1.0, 0.0)

    space, moved = evaluation_space(snapshot, sets), evaluation_space(distorted, sets)
    assert test.sum() > 50 and moved.shape == space.shape  # the test-only category is no axis
    np.testing.assert_array_equal(moved[~test], space[~test])
    columns = [*BASE_FEATURES, "category_share_books"]
    inputs = model_inputs(distorted, columns, LOG_SCALED)
    train = model_inputs(snapshot, columns, LOG_SCALED).loc[sets == "train"]
    np.testing.assert_array_equal(moved[test], fit_block_scaler(train).transform(inputs.loc[test]))
