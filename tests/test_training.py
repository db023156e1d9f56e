"""Time split, scaler, config, sample windows and the training loop, on tiny seeded data."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from finpipe.errors import ModelRejected
from finpipe.metrics import per_date_ic
from finpipe.model_files import load_weights, read_model_metadata, save_model_files
from finpipe.nets import GRURegressor, TemporalCNNRegressor, build_net
from finpipe.plots import close, learning_curve
from finpipe.training import (
    Batches,
    FeatureScaler,
    SeedAverage,
    TrainConfig,
    applied_learning_rate,
    mean_squared_error,
    predict_regressor,
    resolve_device,
    run_training_loop,
    time_split,
    train_regressor,
    window_panel,
)

# ------------------------------------------------------------------------------------ split


def test_time_split_is_chronological_with_exact_embargo_gaps():
    dates = pd.bdate_range("2021-01-01", periods=100)
    shuffled = np.random.default_rng(0).permutation(np.repeat(dates.to_numpy(), 3))  # long frame

    split = time_split(shuffled, validation_fraction=0.15, test_fraction=0.15, embargo=5)

    assert (len(split.train_dates), len(split.validation_dates), len(split.test_dates)) == (
        60,
        15,
        15,
    )
    assert split.train_dates.equals(dates[:60])
    assert split.validation_dates.equals(dates[65:80])
    assert split.test_dates.equals(dates[85:])
    assert split.embargo == 5
    # exactly 5 dates lie strictly between consecutive sets, and none is shared
    position = {d: i for i, d in enumerate(dates)}
    assert position[split.validation_dates[0]] - position[split.train_dates[-1]] - 1 == 5
    assert position[split.test_dates[0]] - position[split.validation_dates[-1]] - 1 == 5
    assert not set(split.train_dates) & set(split.validation_dates)
    assert not set(split.validation_dates) & set(split.test_dates)
    assert split.to_dict()["validation_start"] == dates[65].date().isoformat()


def test_time_split_with_too_few_dates_says_how_many_it_needs():
    dates = pd.bdate_range("2021-01-01", periods=10)
    # 2 validation + 2 test + 2 x 5 embargo + 1 train = 15
    with pytest.raises(ValueError, match="needs at least 15 distinct dates.*got 10"):
        time_split(dates, embargo=5)
    with pytest.raises(ValueError, match="embargo must be >= 0"):
        time_split(dates, embargo=-1)


# ------------------------------------------------------------------------------------ scaler


def test_feature_scaler_ignores_nan_clips_and_keeps_constant_columns_finite():
    train = pd.DataFrame({"a": [1.0, 2.0, 3.0, np.nan], "b": [4.0, 4.0, 4.0, 4.0]})
    scaler = FeatureScaler.fit(train)

    assert scaler.columns == ("a", "b")
    assert scaler.mean == pytest.approx((2.0, 4.0))
    assert scaler.std == pytest.approx((np.sqrt(2.0 / 3.0), 1.0))  # constant column -> std 1

    later = pd.DataFrame(
        {"extra": ["x", "y", "z"], "b": [5.0, 4.0, 4.0], "a": [np.nan, 2.0 + np.sqrt(2 / 3), 100.0]}
    )
    out = scaler.transform(later)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 1.0], [1.0, 0.0], [5.0, 0.0]], atol=1e-6)


def test_feature_scaler_round_trips_through_a_dict():
    train = pd.DataFrame({"a": [0.5, -1.0, 2.0], "b": [np.nan, 3.0, 1.0]})
    scaler = FeatureScaler.fit(train)
    restored = FeatureScaler.from_dict(scaler.to_dict())

    assert restored == scaler
    np.testing.assert_array_equal(restored.transform(train), scaler.transform(train))
    with pytest.raises(ValueError, match=r"\['b'\] missing"):
        scaler.transform(train[["a"]])


# ------------------------------------------------------------------------------------ config


def test_train_config_params_round_trip_and_validation():
    config = TrainConfig(model="gru", hidden=8, learning_rate=0.01)
    params = config.to_params()

    assert params["model"] == "gru" and params["hidden"] == 8 and params["device"] == "auto"
    assert all(isinstance(v, str | int | float) for v in params.values())
    assert TrainConfig.from_params({k: str(v) for k, v in params.items()}) == config
    assert set(TrainConfig.descriptions()) == set(params)
    assert all(TrainConfig.descriptions().values())
    with pytest.raises(ValueError, match="model"):
        TrainConfig(model="transformer")
    with pytest.raises(ValueError, match="dropout"):
        TrainConfig(dropout=1.5)
    with pytest.raises(ValueError, match="unknown TrainConfig parameter"):
        TrainConfig.from_params({"hiden": 3})


# ------------------------------------------------------------------------------------ windows


def test_windows_never_cross_tickers():
    # ticker A has 3 rows, ticker B 2 rows; values encode (ticker, row): A=1x, B=2x
    features = np.array([[10.0], [11.0], [12.0], [20.0], [21.0]], dtype=np.float32)
    groups = np.array([0, 0, 0, 1, 1])

    panel, positions = window_panel(features, groups, lookback=3)
    assert panel.shape == (5 + 2 * 2, 1)
    np.testing.assert_array_equal(positions, [2, 3, 4, 7, 8])

    batches = Batches(torch.from_numpy(panel), rows=torch.from_numpy(positions), lookback=3)
    windows = batches.inputs(torch.arange(5))[..., 0]
    expected = [
        [0.0, 0.0, 10.0],  # A's first row: padded, never B's rows
        [0.0, 10.0, 11.0],
        [10.0, 11.0, 12.0],
        [0.0, 0.0, 20.0],  # B's first row: padded, not A's last rows 11, 12
        [0.0, 20.0, 21.0],
    ]
    np.testing.assert_array_equal(windows.numpy(), expected)


def test_sequence_nets_map_windows_to_one_number_per_row():
    x = torch.randn(7, 12, 4)
    for model in ("gru", "tcn"):
        net = build_net(TrainConfig(model=model, hidden=8, layers=2, lookback=12), n_features=4)
        assert net(x).shape == (7,)
    assert isinstance(build_net(TrainConfig(model="gru"), 4), GRURegressor)
    assert build_net(TrainConfig(model="mlp", hidden=8), 4)(torch.randn(7, 4)).shape == (7,)
    # the CNN's kernel is sized so the last step sees the whole lookback window
    tcn = build_net(TrainConfig(model="tcn", layers=2, lookback=20), 4)
    assert tcn.receptive_field >= 20


def test_building_a_net_leaves_the_global_random_state_alone():
    before = torch.get_rng_state()
    for model in ("mlp", "gru", "tcn"):
        build_net(TrainConfig(model=model, hidden=8, lookback=12, seed=11, seeds=2), 4)
    assert torch.equal(torch.get_rng_state(), before)


def test_cnn_is_still_accepted_as_the_temporal_cnn():
    """Configs, run forms and models saved before the temporal CNN was named tcn say "cnn"."""
    assert TrainConfig(model="cnn") == TrainConfig(model="tcn")
    saved = {**TrainConfig(model="tcn", lookback=8).to_params(), "model": "cnn"}
    assert TrainConfig.from_params(saved).model == "tcn"
    assert TrainConfig(model="cnn").is_sequence
    assert isinstance(build_net(TrainConfig(model="cnn"), 4), TemporalCNNRegressor)
    with pytest.raises(ValueError, match="'mlp', 'gru' or 'tcn'"):
        TrainConfig(model="lstm")


def test_temporal_cnn_is_causal_with_the_stated_receptive_field():
    net = TemporalCNNRegressor(n_features=2, hidden=4, layers=2, dropout=0.0, kernel_size=3).eval()
    assert net.receptive_field == 7  # 1 + (3 - 1) * (1 + 2)
    x = torch.randn(3, 10, 2)
    changed_early, changed_in_field = x.clone(), x.clone()
    changed_early[:, :3] += 1.0  # steps 0..2 lie outside the last 7 steps (3..9)
    changed_in_field[:, 3] += 1.0
    with torch.no_grad():
        assert torch.equal(net(x), net(changed_early))
        assert not torch.allclose(net(x), net(changed_in_field))


# ------------------------------------------------------------------------------------ loop


def _linear_problem(seed: int, n_dates: int = 60, n_tickers: int = 40, n_features: int = 4):
    """Rows of a panel with target = 0.5 x0 - 0.3 x1 + noise(0.3); returns dates too."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_dates * n_tickers, n_features)).astype(np.float32)
    y = (0.5 * x[:, 0] - 0.3 * x[:, 1] + 0.3 * rng.normal(size=len(x))).astype(np.float32)
    dates = np.repeat(np.arange(n_dates), n_tickers)
    return torch.from_numpy(x), torch.from_numpy(y), dates


def test_same_seed_gives_identical_weights_and_history():
    x, y, _ = _linear_problem(0, n_dates=20)
    train, validation = Batches(x[:600], y[:600]), Batches(x[600:], y[600:])
    config = TrainConfig(hidden=8, batch_size=64, max_epochs=3, patience=5, seed=7, device="cpu")
    net = build_net(config, 4)
    rng_before = torch.get_rng_state()

    first = train_regressor(net, train, validation, config)
    second = train_regressor(build_net(config, 4), train, validation, config)
    other_seed = train_regressor(
        net, train, validation, TrainConfig(**{**config.to_params(), "seed": 8})
    )

    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is left alone
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[name]), name
    losses = [(h["train_loss"], h["validation_loss"]) for h in first.history]
    assert losses == [(h["train_loss"], h["validation_loss"]) for h in second.history]
    assert losses != [(h["train_loss"], h["validation_loss"]) for h in other_seed.history]
    assert [h["epoch"] for h in first.history] == [1, 2, 3]
    assert first.device == "cpu" and first.epochs_run == 3
    assert next(first.model.parameters()).device.type == "cpu"


def test_dropout_masks_come_from_the_config_seed_not_the_callers_rng():
    x, y, _ = _linear_problem(6, n_dates=5)
    train, validation = Batches(x[:150], y[:150]), Batches(x[150:], y[150:])
    config = TrainConfig(hidden=8, dropout=0.5, batch_size=32, max_epochs=2, seed=7, device="cpu")
    runs = []
    with torch.random.fork_rng(devices=[]):
        for caller_seed in (1, 2):  # whatever another library left in the global RNG
            torch.manual_seed(caller_seed)
            runs.append(train_regressor(build_net(config, 4), train, validation, config))

    first, second = runs
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[name]), name
    assert first.history[-1]["train_loss"] == second.history[-1]["train_loss"]


def test_an_epochs_train_loss_is_the_mean_over_its_rows_with_a_partial_last_batch():
    """100 rows in batches of 64 and 36: each batch's mean loss weighs by its own rows. At a
    near-zero rate the net barely moves, so the epoch's loss is the untrained net's MSE."""
    x, y, _ = _linear_problem(7, n_dates=5)
    config = TrainConfig(
        hidden=8, dropout=0.0, batch_size=64, max_epochs=1, learning_rate=1e-9, device="cpu"
    )
    net = build_net(config, 4)
    result = train_regressor(net, Batches(x[:100], y[:100]), Batches(x[100:], y[100:]), config)

    with torch.no_grad():
        untrained = float(torch.nn.functional.mse_loss(net.eval()(x[:100]), y[:100]))
    assert result.history[0]["train_loss"] == pytest.approx(untrained, rel=1e-5)


def test_auto_is_cuda_exactly_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"  # a device name only: nothing is moved
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"


def test_the_learning_curve_marks_the_epoch_of_lowest_validation_loss():
    losses = [0.9, 0.8, 0.85, 0.95, 1.0]  # the loop restores epoch 2
    history = [
        {"epoch": e, "train_loss": 1.0 / e, "validation_loss": v} for e, v in enumerate(losses, 1)
    ]
    figure = learning_curve(history, "mlp")
    axes = figure.axes[0]
    handles, labels = axes.get_legend_handles_labels()
    assert labels == ["train", "validation", "best epoch 2"]
    assert list(handles[-1].get_xdata()) == [2, 2]  # the vertical line
    close(figure)


def test_a_seed_average_is_the_mean_of_the_nets_each_seed_trains_alone(tmp_path):
    x, y, _ = _linear_problem(5, n_dates=10)
    train, validation = Batches(x[:300], y[:300]), Batches(x[300:], y[300:])
    config = TrainConfig(hidden=8, batch_size=64, max_epochs=2, seed=3, seeds=3)
    heard: list[dict] = []
    averaged = train_regressor(build_net(config, 4), train, validation, config, heard.append)

    # The reference: three one-net runs from seeds 3, 4 and 5, averaged by hand.
    alone = [
        train_regressor(build_net(single, 4), train, validation, single)
        for single in (
            TrainConfig(**{**config.to_params(), "seed": s, "seeds": 1}) for s in (3, 4, 5)
        )
    ]
    expected = np.mean([predict_regressor(r.model, validation) for r in alone], axis=0)
    assert isinstance(averaged.model, SeedAverage) and len(averaged.model.members) == 3
    np.testing.assert_allclose(predict_regressor(averaged.model, validation), expected, rtol=1e-5)

    def losses(history: list[dict]) -> list[tuple[float, float]]:
        return [(h["train_loss"], h["validation_loss"]) for h in history]

    assert losses(averaged.history) == losses(alone[0].history)
    assert averaged.best_epoch == alone[0].best_epoch
    assert [h["epoch"] for h in heard] == [1, 2]  # the first member's epochs only
    # Saved and read back through the model folder, the architecture comes from the config.
    save_model_files(tmp_path, averaged.model, {})
    restored = load_weights(build_net(config, 4), tmp_path)
    np.testing.assert_allclose(predict_regressor(restored, validation), expected, rtol=1e-5)
    saved_before = {k: v for k, v in config.to_params().items() if k != "seeds"}
    assert TrainConfig.from_params(saved_before).seeds == 1  # models saved before seed averaging


def test_early_stopping_stops_after_patience_and_restores_the_best_epoch():
    x, y, _ = _linear_problem(1, n_dates=20)
    train = Batches(x[:600], y[:600])
    validation = Batches(x[600:], -y[600:])  # the opposite relation: fitting train hurts validation
    config = TrainConfig(hidden=8, batch_size=64, max_epochs=50, patience=3, learning_rate=0.01)
    seen: list[dict] = []

    result = train_regressor(build_net(config, 4), train, validation, config, on_epoch=seen.append)

    validation_losses = [h["validation_loss"] for h in result.history]
    assert result.best_epoch == 1
    assert result.epochs_run == 4 == len(seen)  # best epoch + patience, not max_epochs
    assert seen == result.history
    assert set(seen[0]) == {"epoch", "train_loss", "validation_loss", "seconds"}
    assert min(validation_losses) == validation_losses[0] == result.best_validation_loss
    # the returned weights are those of epoch 1, not of the last epoch
    restored = float(mean_squared_error(result.model, validation, batch_size=256))
    assert restored == pytest.approx(validation_losses[0], rel=1e-5)


def test_the_validation_loss_of_several_outputs_is_a_mean_over_every_value():
    """An autoencoder's 19 outputs: the validation loss is on the training loss's scale (the
    mean over rows and outputs), not 19 times it."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 3, generator=generator), torch.randn(50, 4, generator=generator)
    model = torch.nn.Linear(3, 4)
    expected = float(torch.nn.functional.mse_loss(model(x), y).detach())
    got = float(mean_squared_error(model, Batches(x, y), batch_size=16))
    assert got == pytest.approx(expected, rel=1e-6)


def test_the_learning_rate_is_scaled_down_past_full_rate_steps_an_epoch():
    assert applied_learning_rate(1e-3, steps=200, full_rate_steps=200) == 1e-3
    assert applied_learning_rate(1e-3, steps=100, full_rate_steps=200) == 1e-3
    assert applied_learning_rate(1e-3, steps=500, full_rate_steps=200) == pytest.approx(4e-4)
    assert applied_learning_rate(1e-3, steps=10_000, full_rate_steps=0) == 1e-3  # 0: never


def test_a_loop_past_full_rate_steps_trains_exactly_as_at_the_scaled_rate():
    x, y, _ = _linear_problem(4, n_dates=20)
    train, validation = Batches(x[:640], y[:640]), Batches(x[640:], y[640:])  # 10 batches of 64
    scaled = TrainConfig(
        hidden=8, batch_size=64, max_epochs=3, learning_rate=0.01, full_rate_steps=4
    )
    by_hand = dataclasses.replace(scaled, full_rate_steps=0, learning_rate=0.01 * 4 / 10)
    full = dataclasses.replace(scaled, full_rate_steps=10)  # 10 steps: the full rate
    net = build_net(scaled, 4)

    result = train_regressor(net, train, validation, scaled)
    expected = train_regressor(net, train, validation, by_hand)
    unscaled = train_regressor(net, train, validation, full)

    assert result.learning_rate == pytest.approx(0.004) == expected.learning_rate
    assert unscaled.learning_rate == 0.01
    losses = [(h["train_loss"], h["validation_loss"]) for h in result.history]
    assert losses == [(h["train_loss"], h["validation_loss"]) for h in expected.history]
    assert losses != [(h["train_loss"], h["validation_loss"]) for h in unscaled.history]


def test_mlp_learns_a_linear_signal_to_a_clearly_positive_ic():
    x, y, dates = _linear_problem(2)
    train_end, validation_end = 40 * 40, 50 * 40
    config = TrainConfig(hidden=16, batch_size=128, max_epochs=15, patience=3, learning_rate=3e-3)
    result = train_regressor(
        build_net(config, 4),
        Batches(x[:train_end], y[:train_end]),
        Batches(x[train_end:validation_end], y[train_end:validation_end]),
        config,
    )
    test = Batches(x[validation_end:])
    prediction = predict_regressor(result.model, test, batch_size=64)
    frame = pd.DataFrame(
        {
            "date": dates[validation_end:],
            "prediction": prediction,
            "forward_return_5d": y[validation_end:].numpy(),
        }
    )

    # the best possible IC is corr(signal, signal + noise) = 0.583 / sqrt(0.34 + 0.09) = 0.89
    assert per_date_ic(frame).mean() > 0.8
    assert result.history[-1]["train_loss"] < 0.5 * result.history[0]["train_loss"]


def test_gru_and_cnn_train_on_windows_from_a_panel():
    x, y, _ = _linear_problem(3, n_dates=20, n_tickers=10)
    groups = np.repeat(np.arange(10), 20)  # read the rows as 10 tickers x 20 dates
    panel, positions = window_panel(x.numpy(), groups, lookback=5)
    features, rows = torch.from_numpy(panel), torch.from_numpy(positions)
    train = Batches(features, y[:150], rows[:150], lookback=5)
    validation = Batches(features, y[150:], rows[150:], lookback=5)
    for model in ("gru", "tcn"):
        config = TrainConfig(model=model, hidden=8, lookback=5, batch_size=32, max_epochs=2)
        result = train_regressor(build_net(config, 4), train, validation, config)
        assert result.epochs_run == 2
        assert predict_regressor(result.model, validation).shape == (50,)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_asking_for_cuda_without_one_says_so():
    x, y, _ = _linear_problem(4, n_dates=2, n_tickers=10)
    config = TrainConfig(hidden=4, max_epochs=1, device="cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        train_regressor(
            build_net(config, 4), Batches(x[:10], y[:10]), Batches(x[10:], y[10:]), config
        )


def test_the_shared_loop_fits_any_loss_and_names_what_diverged():
    """`run_training_loop` is what every domain trains through: here a logistic regression."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(400, 3, generator=generator)
    labels = (x[:, 0] - x[:, 1] > 0).float()
    config = TrainConfig(batch_size=32, max_epochs=5, patience=5, learning_rate=0.05)
    net = torch.nn.Linear(3, 1)
    torch.nn.init.zeros_(net.weight)  # starts at chance, ln 2, whatever the global RNG holds
    torch.nn.init.zeros_(net.bias)
    drawn: list[torch.Generator] = []

    def batch_loss(model, index, rng):
        drawn.append(rng)
        logit = model(x[index]).squeeze(-1)
        return torch.nn.functional.binary_cross_entropy_with_logits(logit, labels[index])

    def validation_loss(model):
        with torch.no_grad():
            logit = model(x[300:]).squeeze(-1)
            return torch.nn.functional.binary_cross_entropy_with_logits(logit, labels[300:])

    loop = {"what": "probe", "check": "the labels"}
    result = run_training_loop(
        net, 300, batch_loss, validation_loss, config, torch.device("cpu"), **loop
    )
    losses = [h["validation_loss"] for h in result.history]
    assert result.epochs_run == 5 and losses[-1] < losses[0] < math.log(2) - 0.1
    assert len({id(rng) for rng in drawn}) == 1  # one seeded generator for the whole run
    assert not torch.equal(result.model.weight, net.weight)  # a copy was trained

    def diverged(model):
        return torch.tensor(float("nan"))

    message = r"probe: validation loss was nan at every epoch; .*now 0.05\) or check the labels"
    with pytest.raises(ModelRejected, match=message):
        run_training_loop(net, 300, batch_loss, diverged, config, torch.device("cpu"), **loop)


# ----------------------------------------------------------------------------- model folder


def test_a_model_folder_round_trips_and_refuses_what_it_cannot_read(tmp_path):
    net = torch.nn.Linear(3, 1)
    save_model_files(tmp_path / "model", net, {"feature_columns": ["a", "b", "c"]})
    metadata = read_model_metadata(tmp_path / "model", "test")
    assert metadata == {"format_version": 1, "feature_columns": ["a", "b", "c"]}
    loaded = load_weights(torch.nn.Linear(3, 1), tmp_path / "model")
    assert torch.equal(loaded.weight, net.weight) and not loaded.training
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["model.json", "weights.pt"]

    with pytest.raises(FileNotFoundError, match="does not hold a saved test model"):
        read_model_metadata(tmp_path / "empty", "test")
    # weights of another net: a missing layer, or a layer of another shape
    for other in (torch.nn.Sequential(torch.nn.Linear(3, 1)), torch.nn.Linear(4, 1)):
        with pytest.raises(ValueError, match="does not hold the weights of the net .*model.json"):
            load_weights(other, tmp_path / "model")
    for version in (0, 2):  # an older finpipe's folder, or a newer one's
        (tmp_path / "model" / "model.json").write_text(f'{{"format_version": {version}}}')
        with pytest.raises(ValueError, match=f"format_version {version}, this finpipe reads 1"):
            read_model_metadata(tmp_path / "model", "test")
