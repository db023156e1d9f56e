"""The domain registry: flows are generic, a domain supplies its contract and its steps.

A domain's own parts (contract, features, candidate models, metrics, plots) implement
`finpipe.lifecycle.DomainParts`; `finpipe.lifecycle.bind` wraps them in the shared lifecycle
as a `Domain`, the object the flows, tasks and CLI run. The three built-in domains are listed
in `_BUILT_IN` and imported lazily, so `finpipe --help` does not pay for PyTorch and MLflow;
another domain is added with `register_domain(domain)`, without editing this file or the flows.
An installed package makes its domain known to every finpipe process (the CLI, a deployment's
flow runs, Dask workers) with an entry point in the group `finpipe.domains`: the domain's name
= its `Domain` object (`pkg.pipeline:FX`) or a module whose import registers it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

from finpipe.errors import ConfigError

if TYPE_CHECKING:
    import datetime as dt

    from pydantic import BaseModel

    from finpipe.features import FeatureUpdate
    from finpipe.ingest import RawContract
    from finpipe.promotion import PromotionDecision
    from finpipe.scoring import ScoringOutcome
    from finpipe.settings import Settings
    from finpipe.storage import Storage

_BUILT_IN = {
    "market": "finpipe.market.pipeline:MARKET",
    "credit": "finpipe.credit.pipeline:CREDIT",
    "customers": "finpipe.customers.pipeline:CUSTOMERS",
}
# A built-in domain's ingest contract as its settings make it, without its models' imports.
_BUILT_IN_CONTRACTS = {
    "market": "finpipe.market.contract:active_contract",
    "credit": "finpipe.credit.contract:active_contract",
    "customers": "finpipe.customers.contract:active_contract",
}
# Whether a built-in domain's scoring reads earlier dates' features (`Domain.scores_history`),
# known without its models' imports (test_domain_seam checks it against the domains).
_BUILT_IN_SCORES_HISTORY = {"market": False, "credit": True, "customers": False}
_REGISTERED: dict[str, Domain] = {}
ENTRY_POINTS = "finpipe.domains"  # the entry-point group of installed domain packages
# Installed domains whose entry point failed to load, with why (once per process).
_BROKEN: dict[str, str] = {}
# "unloaded", "loading" (by the thread holding `_PLUGINS_LOCK`) or "loaded".
_plugins = "unloaded"
_PLUGINS_LOCK = threading.RLock()


class UpdateFeatures(Protocol):
    def __call__(
        self,
        storage: Storage,
        as_of: dt.date | str,
        *,
        rebuild: bool = False,
        progress: Callable[[str], None] | None = None,
        also: Collection[dt.date] = (),
    ) -> FeatureUpdate: ...


class Train(Protocol):
    def __call__(
        self,
        storage: Storage,
        settings: Settings,
        as_of: dt.date | str,
        config: BaseModel | None = None,
        *,
        progress: Callable[[str], None] | None = None,
        tags: Mapping[str, str] | None = None,
        holder: str = "training",
        lock_timeout: float | None = None,
    ) -> ChallengerOutcome: ...


class Promote(Protocol):
    def __call__(
        self,
        storage: Storage,
        settings: Settings,
        outcome: ChallengerOutcome,
        *,
        lock_timeout: float | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> PromotionDecision: ...


class Score(Protocol):
    def __call__(
        self, storage: Storage, settings: Settings, as_of: dt.date | str
    ) -> ScoringOutcome: ...


@dataclass(frozen=True)
class Domain:
    """One use of finpipe (market, credit, customers, ...): its raw contract and the pipeline
    steps the flows run. Built by `finpipe.lifecycle.bind` from the domain's own parts."""

    name: str
    contract: RawContract
    update_features: UpdateFeatures
    train: Train  # registers the best candidate as `challenger`
    promote: Promote  # challenger against champion on the same window
    score: Score  # publishes predictions/<domain>/<as_of>
    training_config: type[BaseModel]  # the domain's hyper-parameters (Prefect form, MLflow)
    training_outcome: type[ChallengerOutcome]  # what `train` returns (rebuilt from a dict)
    plan_demo: Callable[[Settings], list[DemoNight]] | None = None  # `finpipe demo`'s nights
    code_module: str = "finpipe"  # the module defining the domain's parts (and its models)
    # Scoring a date reads earlier dates' features too (`DomainParts.scores_history`).
    scores_history: bool = False
    # The settings its features are computed with (`DomainParts.feature_definition`).
    feature_definition: Mapping[str, object] = field(default_factory=dict)


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

    def to_dict(self) -> dict:  # type: ignore[type-arg]  # fields of several types, rebuilt by **
        return asdict(self)


@dataclass(frozen=True)
class DemoNight:
    """One night of the demo: the as-of date, the files delivered that night, overrides."""

    as_of: str
    inputs: list[str]
    training: dict[str, object] = field(default_factory=dict)


def demo_nights(
    files: list[Path], as_of: Callable[[Path], str], training: dict[str, object] | None = None
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
    """Return the names of every registered domain: the built-ins first (the demo's order),
    then those registered in this process or by installed packages (`ENTRY_POINTS`)."""
    load_installed_domains()
    return [*_BUILT_IN, *(name for name in _REGISTERED if name not in _BUILT_IN)]


def check_domain(name: str) -> str:
    """Return `name` if a domain is registered under it; ConfigError listing the known ones
    (or, for an installed domain that failed to load, why).

    Unlike `get_domain` it leaves a built-in domain's modules unimported (torch, MLflow,
    LightGBM: seconds), so a command refusing a bad parameter says so at once.
    """
    load_installed_domains()
    if name in _REGISTERED or name in _BUILT_IN:
        return name
    if name in _BROKEN:
        raise ConfigError(f"domain {name!r} is installed but failed to load: {_BROKEN[name]}")
    raise ConfigError(f"unknown domain {name!r}; known domains: {', '.join(domain_names())}")


def domain_contract(name: str) -> RawContract:
    """Return the ingest contract of the domain called `name`: `get_domain(name).contract`,
    but for a built-in domain without importing its models (torch, MLflow, LightGBM), so
    `finpipe ingest` starts in seconds fewer; `check_domain`'s ConfigError if none."""
    if check_domain(name) in _REGISTERED:
        return _REGISTERED[name].contract
    active_contract = cast("Callable[[], RawContract]", _imported(_BUILT_IN_CONTRACTS[name]))
    return active_contract()


def domain_scores_history(name: str) -> bool:
    """Return `get_domain(name).scores_history`, but for a built-in domain without importing
    its models, so `finpipe status` and a backfill's plan start seconds sooner."""
    if check_domain(name) in _REGISTERED:
        return _REGISTERED[name].scores_history
    return _BUILT_IN_SCORES_HISTORY[name]


def get_domain(name: str) -> Domain:
    """Return the registered domain called `name`; `check_domain`'s ConfigError if none."""
    if check_domain(name) in _REGISTERED:
        return _REGISTERED[name]
    return cast(Domain, _imported(_BUILT_IN[name]))


def _imported(target: str) -> object:
    """Return what a built-in table's `module:attribute` names, importing its module."""
    module_name, attribute = target.split(":")
    return getattr(importlib.import_module(module_name), attribute)


def register_domain(domain: Domain) -> None:
    """Make `domain` runnable by every flow, task and command under `domain.name`.

    The name must be a safe path component (it names storage folders, the MLflow experiment
    and the registered model); registering a name again replaces the earlier domain.
    """
    from finpipe.storage import check_name

    _REGISTERED[check_name(domain.name)] = domain


def load_installed_domains() -> None:
    """Register the domains of installed packages (entry points in the group `ENTRY_POINTS`),
    once per process. One that fails to import, or does not register the domain its entry
    point names, is left out with a warning; asking for it by name says why.

    Another thread asking meanwhile waits until every package is loaded (a Dask worker's
    threads start tasks at once); a package that asks the registry while it is imported
    (the loading thread again) sees the domains loaded so far."""
    global _plugins
    if _plugins == "loaded":
        return
    with _PLUGINS_LOCK:
        if _plugins != "unloaded":  # loaded meanwhile, or this thread is loading them
            return
        _plugins = "loading"
        try:
            _load_entry_points()
        finally:
            _plugins = "loaded"


def _load_entry_points() -> None:
    for entry in importlib.metadata.entry_points(group=ENTRY_POINTS):
        try:
            loaded = entry.load()
            if isinstance(loaded, Domain):
                register_domain(loaded)
            if entry.name not in _REGISTERED:
                raise ConfigError(f"{entry.value} registered no domain named {entry.name!r}")
        except Exception as error:  # a broken plugin must not take the built-ins down
            _BROKEN[entry.name] = f"{type(error).__name__}: {error} (entry point {entry.value})"
            logging.getLogger(__name__).warning(
                "finpipe domain %r left out: %s", entry.name, _BROKEN[entry.name]
            )


def unregister_domain(name: str) -> None:
    """Forget a domain added with `register_domain` (the built-ins stay)."""
    _REGISTERED.pop(name, None)


def trusted_model_module(module_name: str) -> bool:
    """Return whether finpipe may load a model class from `module_name`: finpipe's own, or
    the module of a registered domain's parts and the modules beside it in its package (its
    code is already trusted and imported: `fxdom.model` for a domain whose parts are in
    `fxdom.pipeline`; not `acme.payments` for one in `acme.fx.pipeline`)."""
    if module_name.startswith("finpipe."):
        return True
    load_installed_domains()
    for domain in _REGISTERED.values():
        package = domain.code_module.rpartition(".")[0]
        if module_name == domain.code_module or (package and module_name.startswith(package + ".")):
            return True
    return False
