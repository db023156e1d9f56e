"""The domain registry: flows are generic, a domain supplies its contract and its steps.

Adding a domain means writing its module and one line in `_REGISTRY`, not editing the flows.
Domains are imported lazily so `finpipe --help` does not pay for PyTorch and MLflow.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finpipe.errors import ConfigError

_REGISTRY = {
    "market": "finpipe.market.pipeline:MARKET",
    "credit": "finpipe.credit.pipeline:CREDIT",
    "customers": "finpipe.customers.pipeline:CUSTOMERS",
}


@dataclass(frozen=True)
class Domain:
    """One use of finpipe (market, credit, customers): its raw contract and pipeline steps."""

    name: str
    contract: Any  # finpipe.ingest.RawContract
    update_features: Callable[..., Any]  # (storage, as_of, *, rebuild, progress) -> FeatureUpdate
    train: Callable[..., Any]  # (storage, settings, as_of, config, *, progress) -> TrainingOutcome
    promote: Callable[..., Any]  # (storage, settings, outcome) -> PromotionDecision
    score: Callable[..., Any]  # (storage, settings, as_of) -> ScoringOutcome
    training_config: type  # pydantic model of the domain's hyper-parameters
    training_outcome: type  # ChallengerOutcome subclass `train` returns (rebuilt from a dict)
    # (settings) -> list[DemoNight]: writes synthetic deliveries for `finpipe demo`.
    plan_demo: Callable[..., list[DemoNight]] | None = None


@dataclass
class ChallengerOutcome:
    """What every domain's `train` returns at least: the registered challenger, the metrics
    behind its choice ({model: {window: {metric: value}}}) and the run they are logged in.

    The flows read and report these fields; a domain's outcome adds what its `promote` needs
    to rebuild the evaluation window.
    """

    run_id: str
    as_of: str
    candidate: str
    challenger_version: str
    promotion_metric: str
    metrics: dict[str, dict[str, dict[str, float]]]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DemoNight:
    """One night of the demo: the as-of date, the files delivered that night, overrides."""

    as_of: str
    inputs: list[str]
    training: dict = field(default_factory=dict)


def demo_nights(
    files: list[Path], as_of: Callable[[Path], str], training: dict | None = None
) -> list[DemoNight]:
    """Return one night per daily file of `files` (the history file first, then the dailies).

    The first night loads the history file and the first daily file; each later night one
    daily file. `as_of` reads a daily file's as-of date (ISO text) from it.
    """
    history, dailies = files[0], files[1:]
    return [
        DemoNight(
            as_of=as_of(daily),
            inputs=[str(history), str(daily)] if night == 0 else [str(daily)],
            training=dict(training or {}),
        )
        for night, daily in enumerate(dailies)
    ]


def domain_names() -> list[str]:
    """Return the names of every registered domain, market first (the demo's order)."""
    return list(_REGISTRY)


def get_domain(name: str) -> Domain:
    """Return the registered domain called `name`; ConfigError listing the known ones."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown domain {name!r}; known domains: {', '.join(domain_names())}")
    module_name, attribute = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), attribute)
