"""The backtest flow: walk-forward retrains through a past range, windows run in parallel and
resumable, then the portfolio report (`finpipe.backtest`, `finpipe.portfolio`)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Annotated, Any

from finpipe.flows.run_setup import RunSetup, date_runner, set_up_run, with_run_id_suffix
from finpipe.flows.summaries import artifact_key
from finpipe.tasks.backtest import backtest_window
from finpipe.tasks.dates import update_features
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from pydantic import Field

from finpipe.backtest import (
    BacktestConfig,
    BacktestIncomplete,
    PlannedWindow,
    WindowOutcome,
    backtest_config,
    backtest_run,
    backtest_training,
    check_within_data,
    evaluate_backtest,
    outcome_from_record,
    plan_backtest,
    record_report,
    record_windows,
    report_markdown,
)
from finpipe.market.model import MARKET_MODEL_KINDS
from finpipe.market.schema import DOMAIN
from finpipe.planning import training_config
from finpipe.settings import Settings

ModelNames = Annotated[
    list[str], Field(min_length=1, json_schema_extra={"items": {"enum": list(MARKET_MODEL_KINDS)}})
]


def _run_name() -> str:
    """Name a run after its backtest and range, then the end of its run id
    (`with_run_id_suffix`): a backtest run again to redo failed windows gets a name of its own
    in the Prefect UI."""
    parameters = flow_run.parameters
    name, start, end = parameters.get("name", "default"), parameters["start"], parameters["end"]
    return with_run_id_suffix(f"backtest-{name}-{start}-to-{end}")


@flow(name="backtest", flow_run_name=_run_name, log_prints=True)
def backtest(
    start: dt.date,
    end: dt.date,
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")] = "default",
    retrain_every: Annotated[int, Field(ge=1, le=2520)] = 63,
    train_window: Annotated[int | None, Field(ge=20)] = None,
    models: ModelNames = ["mlp"],  # noqa: B006 (never mutated; the form shows the list)
    horizon: Annotated[int, Field(ge=1, le=60)] = 5,
    top_k: Annotated[int, Field(ge=1)] = 10,
    n_drop: Annotated[int | None, Field(ge=1)] = None,
    cost_bps: Annotated[float, Field(ge=0, le=1000)] = 10.0,
    concurrency: Annotated[int, Field(ge=1, le=16)] = 2,
    training: dict[str, Any] = {},  # noqa: B006 (never mutated; the form shows an empty object)
    force: bool = False,
) -> dict:
    """Walk-forward backtest of the market models: retrain on schedule, score out of sample,
    trade the signal on paper.

    Features are brought up to date first. Each retrain learns only from labels realised
    before its date (the nightly's training code, scaler fitted on its window) and scores the
    sessions up to the next retrain. Predictions go to backtests/<name>/predictions/, never to
    the nightly's. Windows run several at a time; running the same backtest again redoes only
    windows that failed, are missing or whose data or parameters changed. One MLflow run
    `backtest-<name>` holds the report, with a nested run per window and model (never
    registered); a markdown artifact has the tables.

    Args:
        start: First date scored out of sample (YYYY-MM-DD); history before it trains the first
            window.
        end: Last date scored, included.
        name: Names the backtest: its store backtests/NAME/ and MLflow run backtest-NAME.
        retrain_every: Sessions of the market calendar between retrains (21 monthly, 63
            quarterly).
        train_window: Labelled dates each retrain learns from: empty for all dates before the
            cut-off (expanding), N for the last N (rolling).
        models: Models trained in every window, each backtested on its own: mlp, gru, tcn
            (temporal CNN), lgbm (LightGBM trees), ensemble (the models listed beside it
            combined, weights chosen on the window's validation dates).
        horizon: Forward-return horizon in sessions (the label, the embargo and the IC).
        top_k: Names held on each side of the portfolios.
        n_drop: Names the turnover-limited long-only portfolio may replace a day (empty:
            top_k // 5, at least 1).
        cost_bps: Trading cost in basis points of traded value.
        concurrency: How many windows train at the same time.
        training: Hyper-parameter overrides, e.g. {"max_epochs": 10, "hidden": 32} (models and
            horizon are fields of their own).
        force: Redo every window, even those done from the same data and parameters.
    """
    run = set_up_run("backtest", DOMAIN)
    config = backtest_config(
        name=name,
        start=start,
        end=end,
        retrain_every=retrain_every,
        train_window=train_window,
        top_k=top_k,
        n_drop=n_drop,
        cost_bps=cost_bps,
        training=training_config(DOMAIN, backtest_training(training, models, horizon)),
    )
    check_within_data(end, max(run.validated_dates(end=None), default=None))
    update_features(DOMAIN, end.isoformat(), run.holder, run.lock_timeout)
    plan = plan_backtest(run.storage, config, run.calendar.sessions(start, end), force=force)
    todo = [p for p in plan if not p.done]
    get_run_logger().info(
        "backtest %s %s to %s: %d windows to run, %d already done",
        *(name, start, end, len(todo), len(plan) - len(todo)),
    )
    report = None
    key = artifact_key("backtest", name)
    with backtest_run(run.settings, config) as parent_run_id:
        started = time.perf_counter()
        outcomes = _run_windows(run, config, plan, parent_run_id, concurrency)
        windows_seconds = round(time.perf_counter() - started, 3)
        record_windows(outcomes)
        failed = [o for o in outcomes if o.status == "failed"]
        if not failed:
            report = evaluate_backtest(run.storage, config)
            record_report(report)
        create_markdown_artifact(key=key, markdown=report_markdown(config, report, outcomes))
        if failed:
            raise BacktestIncomplete(
                f"{len(failed)} of {len(outcomes)} windows failed (first: {failed[0].retrain}: "
                f"{failed[0].message}); run the same backtest again to redo only those"
            )
    assert report is not None
    return {
        "name": name,
        "run_id": parent_run_id,
        "windows": [o.to_dict() for o in outcomes],
        "windows_seconds": windows_seconds,
        "summary": report.summary.to_dict("records"),
        "metrics": report.metrics(),
    }


def _run_windows(
    run: RunSetup,
    config: BacktestConfig,
    plan: list[PlannedWindow],
    parent_run_id: str,
    concurrency: int,
) -> list[WindowOutcome]:
    """Run the plan's windows not done, at most `concurrency` at a time; return every window's
    outcome in date order, those done earlier included."""
    store = run.storage.backtest_store(config.name)
    outcomes = {p.window: outcome_from_record(store, p.window) for p in plan if p.done}
    if len(outcomes) == len(plan):
        return [outcomes[p.window] for p in plan]
    slots = threading.BoundedSemaphore(concurrency)
    futures: dict[PlannedWindow, PrefectFuture] = {}
    with _window_runner(run.settings, concurrency) as runner:
        for planned in plan:
            if planned.done:
                continue
            slots.acquire()
            futures[planned] = runner.submit(
                backtest_window,
                {
                    "config": config.model_dump(mode="json"),
                    "window": planned.window.to_dict(),
                    "fingerprint": planned.fingerprint,
                    "parent_run_id": parent_run_id,
                },
            )
            futures[planned].add_done_callback(lambda _: slots.release())
        for planned, future in futures.items():
            outcomes[planned.window] = _outcome_of(planned, future)
    return [outcomes[window] for window in sorted(outcomes, key=lambda w: w.retrain)]


def _window_runner(settings: Settings, concurrency: int) -> TaskRunner:
    """Return the task runner the windows run on: prefect-dask's on the Dask scheduler at
    FINPIPE_DASK_ADDRESS (`run_setup.date_runner`), else a pool of `concurrency` processes.

    Processes, not threads: a net's dropout draws from torch's global random state, which the
    threads of one process share, so two windows training at once in threads would each get
    other numbers than alone; in its own process a window is the same at any concurrency (and
    the same as one at a time in the flow's process, with `concurrency` 1).
    """
    if settings.dask_address:
        return date_runner(settings, concurrency)
    if concurrency == 1:  # one window at a time: the flow's process, no start-up cost
        return ThreadPoolTaskRunner(max_workers=1)
    return ProcessPoolTaskRunner(max_workers=concurrency)


def _outcome_of(planned: PlannedWindow, future: PrefectFuture) -> WindowOutcome:
    """A window's outcome from its task; a failed window is reported, never stops the rest."""
    try:
        return WindowOutcome(**future.result())
    except Exception as error:  # recorded as failed, reported, redone by the next run
        window = planned.window
        return WindowOutcome(
            window.key,
            window.last.isoformat(),
            "failed",
            message=f"{type(error).__name__}: {error}",
        )
