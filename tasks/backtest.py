"""The backtest's unit of work as a Prefect task: one walk-forward window (`finpipe.backtest`)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from finpipe import tracking
from finpipe.backtest import BacktestConfig, PlannedWindow, Window, run_window
from finpipe.market.schema import DOMAIN
from finpipe.settings import load_settings
from finpipe.storage import Storage
from finpipe.training import torch_threads


# No retries: a window that fails (too little history, a bad parameter) fails the same way
# again; a re-run of the backtest redoes it, and only it. No result cache either: the window
# record in storage says what is done.
@task(name="backtest-window", task_run_name="window-{window[retrain]}", cache_policy=NO_CACHE)
def backtest_window(config: dict, window: dict, fingerprint: str, parent_run_id: str) -> dict:
    """Train the window's models, log them under the backtest's MLflow run, publish its
    out-of-sample predictions and record it done."""
    logger = get_run_logger()
    settings = load_settings()
    tracking.use_tracking(settings, DOMAIN)  # the worker process's own MLflow set-up
    planned = PlannedWindow(Window.from_dict(window), fingerprint, done=False)
    # One torch thread per window: the small nets are bound by the cost of each operation,
    # not arithmetic (see `torch_threads`); `concurrency` windows use the cores.
    with torch_threads(1):
        outcome = run_window(
            Storage(settings.home),
            BacktestConfig.model_validate(config),
            planned,
            parent_run_id=parent_run_id,
            say=logger.info,
        )
    return outcome.to_dict()
