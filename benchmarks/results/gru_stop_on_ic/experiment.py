"""One-off experiment (2026-12-05, not part of the product or the tests): early stopping on
validation IC instead of validation loss, for the market GRU. It patches two internals in this
process only: `training_samples` also records each validation sample's date, and the
validation criterion `mean_squared_error` becomes minus the mean daily Pearson IC of the
validation predictions. Usage (repository root, PYTHONPATH=.):
    python benchmarks/results/gru_stop_on_ic/experiment.py {loss|ic} gru 0,1,2 200 1000
One JSON line per seed; results in README.md beside this file."""
import sys, json, time
import numpy as np, pandas as pd, torch
import finpipe.market.model as mm
import finpipe.training as tr
from benchmarks.qlib_peer import training_panel, synthetic_prices, fit_finpipe, test_metrics
from finpipe.market.model import MarketTrainingConfig

GROUPS = {}
orig_ts = mm.training_samples
def ts(frame, feature_columns, split, config, *, label="forward_return_5d", target="return"):
    s = orig_ts(frame, feature_columns, split, config, label=label, target=target)
    dates = mm._date_keys(frame["date"]); tick = mm._ticker_codes(frame["ticker"])
    order = np.lexsort((dates, tick))
    targets = mm._targets(frame, label, target)[order]
    in_val = frame["date"].isin(split.validation_dates).to_numpy()[order]
    vrows = np.isfinite(targets) & in_val
    _, codes = np.unique(dates[order][vrows], return_inverse=True)
    assert len(codes) == len(s.validation)
    GROUPS[id(s.validation.rows)] = torch.from_numpy(codes.astype(np.int64))
    return s
orig_mse = tr.mean_squared_error
@torch.no_grad()
def mse_or_ic(model, batches, batch_size):
    g = GROUPS.get(id(batches.rows)) if MODE == "ic" else None
    if g is None:
        return orig_mse(model, batches, batch_size)
    model.eval(); outs = []
    for start in range(0, len(batches), batch_size):
        index = torch.arange(start, min(start + batch_size, len(batches)))
        outs.append(model(batches.inputs(index)))
    p = torch.cat(outs).double(); y = batches.targets.double(); G = int(g.max()) + 1
    def s(v): return torch.zeros(G, dtype=torch.float64).scatter_add_(0, g, v)
    n = s(torch.ones_like(p)); mp = s(p) / n; my = s(y) / n
    cov = s(p * y) / n - mp * my; vp = s(p * p) / n - mp**2; vy = s(y * y) / n - my**2
    ic = cov / torch.sqrt(vp * vy)
    ok = torch.isfinite(ic) & (n >= 2)
    return -(ic[ok].mean()).float()
mm.training_samples = ts
tr.mean_squared_error = mse_or_ic

MODE = sys.argv[1]; kind = sys.argv[2]; seeds = [int(x) for x in sys.argv[3].split(",")]
tickers, days = int(sys.argv[4]), int(sys.argv[5])
for seed in seeds:
    config = MarketTrainingConfig(models=[kind], seed=seed)
    panel = training_panel(synthetic_prices(tickers, days, seed, config.horizon), config, f"s{seed}")
    t = time.process_time()
    pred, facts = fit_finpipe(panel, kind, config)
    m = test_metrics(panel, pred)
    print(json.dumps({"mode": MODE, "kind": kind, "seed": seed, "test_ic": round(m["ic"], 4), "test_rank_ic": round(m["rank_ic"], 4),
        "val_ic": round(facts.get("validation_ic", float("nan")), 4), "epochs": facts["epochs"], "best_epoch": facts["best_epoch"], "cpu_s": round(time.process_time() - t, 1)}), flush=True)
