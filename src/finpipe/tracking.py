"""MLflow at the edge: experiments, runs, model logging, the registry and champion promotion.

Models are logged as MLflow pyfunc models that wrap a finpipe model folder (weights plus the
fitted scaler and feature list), so `models:/<name>@champion` is all scoring needs, and
`mlflow.pyfunc.load_model` or `mlflow models serve` can use a model without finpipe's code
paths. finpipe's own steps resolve the version in the registry, fetch its artifacts through
MLflow and read the folder with the class the pyfunc would use (see `load_model_version`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import importlib.metadata
import logging
import os
import socket
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.data.pandas_dataset import from_pandas  # mlflow.data sets it at import: untyped
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from finpipe.domains import trusted_model_module
from finpipe.errors import ScoringError, TrackingUnavailable
from finpipe.services.processes import start_time, still_running
from finpipe.settings import Settings, redact_uri
from finpipe.storage import check_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CHAMPION = "champion"
CHALLENGER = "challenger"
# Tag of a registered version the quality floor refused: why, in words (see lifecycle).
QUALITY_FLOOR_TAG = "quality_floor_refused"
AS_OF_TAG = "as_of"  # on a registered version: the as-of date its training read data up to
# On a registered version: its promotion's outcome (promoted or kept) and the reason in words.
PROMOTION_TAG, PROMOTION_REASON_TAG = "promotion", "promotion_reason"

# Every run finpipe starts or resumes carries its owner: host, process id and the process's
# start time. A run still RUNNING whose owner on this host is gone was killed with its process
# (SIGKILL, the OOM killer, a reboot) and is closed as KILLED, with CLOSED_TAG saying why, when
# the domain next sets up tracking (`close_abandoned_runs`).
OWNER_TAG = "finpipe.owner"
CLOSED_TAG = "finpipe.closed"
# When a training read its data (UTC, to the microsecond): `finpipe validated DOMAIN --known-at` it
# to get the validated rows it was built from, whatever corrections came later.
DATA_KNOWN_AT_TAG = "finpipe.validated_known_at"

log = logging.getLogger(__name__)


def owner_tags() -> dict[str, str]:
    """The tags naming this process as the owner of a run it starts or resumes."""
    pid = os.getpid()
    return {OWNER_TAG: f"{socket.gethostname()} {pid} {start_time(pid) or '-'}"}


def close_abandoned_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the runs of `experiment_id` still RUNNING whose owner, a process on this
    host, is gone; return their ids. Runs owned on other hosts or by a live process, and runs
    with no owner tag (older finpipe, other tools), are left as they are: nothing proves them
    dead."""
    client = MlflowClient()
    here = socket.gethostname()
    closed = []
    running = client.search_runs(
        [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
    )
    for found in running:
        host, _, process = found.data.tags.get(OWNER_TAG, "").partition(" ")
        pid, _, started = process.partition(" ")
        if host != here or not pid.isdigit() or started in ("", "-"):
            continue  # another machine's, or a start time that could not be read
        if still_running(int(pid), started):
            continue  # another night on this machine
        client.set_tag(
            found.info.run_id,
            CLOSED_TAG,
            f"its process (pid {pid} on {host}) had gone when a later run checked, "
            f"{pd.Timestamp.now(tz='UTC'):%Y-%m-%d %H:%M} UTC",
        )
        client.set_terminated(found.info.run_id, status="KILLED")
        closed.append(found.info.run_id)
    if closed:
        log.warning(
            "Marked %d MLflow run(s) KILLED: left RUNNING by a process that is gone (%s)",
            len(closed),
            ", ".join(closed),
        )
    return closed


def use_tracking(settings: Settings, domain: str) -> str:
    """Point MLflow at the configured tracking URI and experiment; return the experiment id.
    Runs of the experiment that a killed process left RUNNING are closed first
    (`close_abandoned_runs`).

    Raises TrackingUnavailable (transient: orchestration retries it) when a tracking server
    does not answer, with the URI's credentials masked.
    """
    settings.local_home.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.tracking_uri)
    name = settings.experiment_name(domain)
    try:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            # A server owns its artifact store; only a local set-up gets our folder.
            location = settings.mlflow_artifact_root or (
                settings.artifact_root if settings.tracking_is_local else None
            )
            experiment_id = mlflow.create_experiment(name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
    except MlflowException as error:
        if settings.tracking_is_local or not _is_connection_error(error):
            raise
        raise TrackingUnavailable(
            f"MLflow tracking server {settings.tracking_uri_for_display} is unreachable "
            f"({_short(error)}); start it or set FINPIPE_MLFLOW_TRACKING_URI"
        ) from None
    mlflow.set_experiment(experiment_id=experiment_id)
    close_abandoned_runs(experiment_id)
    return experiment_id


def _is_connection_error(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(
        word in text
        for word in ("connection", "max retries", "timed out", "refused", "unreachable")
    )


def _short(error: BaseException) -> str:
    return redact_uri(str(error).splitlines()[0])[:200]


MODEL_CODE = Path(__file__).with_name("mlflow_model.py")


# Tags on every logged model (MLflow 3's LoggedModel, the experiment's Models tab): which domain
# and candidate it is; AS_OF_TAG says the date its training read data up to.
DOMAIN_TAG = "finpipe.domain"
CANDIDATE_TAG = "finpipe.candidate"


def logged_model_name(domain: str, candidate: str) -> str:
    """The name a domain's candidate is logged under (e.g. `market-mlp`): each of a night's
    models is told apart by name in the Models tab, and `runs:/<run id>/<name>` finds it."""
    return f"{domain}-{candidate}"


def log_fitted_model(
    fitted,
    *,
    name: str,
    loader: str,
    input_example: pd.DataFrame,
    output_example: pd.DataFrame,
    tags: Mapping[str, str] | None = None,
    registered_model_name: str | None = None,
):
    """Log `fitted` (anything with save(dir)) as a pyfunc model called `name` in the active
    run, with `tags` on the logged model (see `logged_model_name`, DOMAIN_TAG, CANDIDATE_TAG).

    Returns MLflow's ModelInfo (with `registered_model_version` when registered); its
    `model_uri` is `models:/<model id>`, whatever the name. The
    signature declares float columns as double whatever the example's width (market features
    are float32): MLflow's pyfunc widens float32 input to a double column but refuses float64
    input to a float one, the width of features read from a CSV or computed in pandas.
    """
    import torch

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # Hints about the examples' types (e.g. that an integer column could not hold a
        # missing value) say nothing about finpipe's models, which check their own inputs.
        warnings.simplefilter("ignore")
        signature = infer_signature(_floats_as_double(input_example), output_example)
        model_dir = Path(tmp) / "model"
        fitted.save(model_dir)
        return mlflow.pyfunc.log_model(
            name=name,
            tags=dict(tags or {}),
            python_model=str(MODEL_CODE),
            model_config={"loader": loader},
            artifacts={"model_dir": str(model_dir)},
            signature=signature,
            input_example=input_example,
            registered_model_name=registered_model_name,
            pip_requirements=[
                "finpipe",
                f"torch=={torch.__version__.split('+')[0]}",
                f"pandas=={pd.__version__}",
                f"mlflow=={mlflow.__version__}",
            ],
        )


def _floats_as_double(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with its float32 columns as float64."""
    narrow = frame.select_dtypes("float32").columns
    return frame.astype(dict.fromkeys(narrow, "float64"))


@dataclass(frozen=True)
class RegisteredModel:
    """The model scoring uses, with the registry facts every prediction row records."""

    name: str
    version: str
    run_id: str
    model: Any  # the finpipe model read from the version's folder (e.g. FittedSegmentModel)

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        return self.model.predict(frame)


def load_model_version(
    settings: Settings, domain: str, alias: str = CHAMPION, version: str | None = None
) -> RegisteredModel:
    """Load a registered model by alias (default `champion`) or version; ScoringError if absent.

    Only the configured registry is consulted: models are never loaded from arbitrary paths.
    The model is the finpipe class its pyfunc wraps, read from the version's artifacts; its
    `predict` checks its own inputs (a missing feature column is a ValueError naming it).
    """
    mlflow.set_tracking_uri(settings.tracking_uri)
    name = settings.model_name(check_name(domain))
    client = MlflowClient()
    try:
        if version is not None:
            found = client.get_model_version(name, str(version))
        else:
            found = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        wanted = f"version {version}" if version is not None else f"alias {alias!r}"
        refused = _refused_challenger(client, name) if alias == CHAMPION and not version else ""
        raise ScoringError(
            f"no model {name!r} with {wanted} in the registry at "
            f"{settings.tracking_uri_for_display}; nothing is scored. "
            + (refused or f"Run `finpipe run nightly --domain {domain}` to train one")
        ) from None
    run_id = found.run_id
    if run_id is None:  # MLflow allows it; finpipe registers every version from a training run
        raise ScoringError(
            f"model {name!r} version {found.version} has no source run, so its predictions "
            "could not record one; register versions through `finpipe run nightly`"
        )
    key = (settings.tracking_uri, name, str(found.version), run_id)
    with _LOADED_LOCK:
        model = _LOADED.get(key)
        if model is None:
            model = _load_finpipe_model(f"models:/{name}/{found.version}")
            _LOADED[key] = model
            while len(_LOADED) > _LOADED_LIMIT:
                _LOADED.popitem(last=False)
        else:
            _LOADED.move_to_end(key)
    return RegisteredModel(name=name, version=str(found.version), run_id=run_id, model=model)


# Loaded models by (tracking URI, name, version, run id). A registered version's artifacts never
# change, so a process scoring many dates (a backfill, the benchmark) loads each version once;
# the alias is still resolved on every call, so a promotion takes effect at the next date.
_LOADED: OrderedDict[tuple[str, str, str, str], object] = OrderedDict()
_LOADED_LIMIT = 4
_LOADED_LOCK = threading.Lock()


def _refused_challenger(client: MlflowClient, name: str) -> str:
    """Why the latest challenger did not become champion, when the quality floor refused it."""
    try:
        found = client.get_model_version_by_alias(name, CHALLENGER)
    except MlflowException:
        return ""
    reason = found.tags.get(QUALITY_FLOOR_TAG)
    if not reason:
        return ""
    return (
        f"The latest challenger, v{found.version}, was refused by the quality floor ({reason}): "
        "no model has yet beaten the naive baseline on validation"
    )


def _load_finpipe_model(uri: str) -> Any:
    """Fetch a logged model's artifacts and read its finpipe folder with the pyfunc's loader.

    The same folder and class `mlflow.pyfunc.load_model(uri)` would use (MLmodel's
    `config.loader`), without the pyfunc machinery around them: that load parses MLmodel three
    times and fetches artifacts five times (a customers model: 38-43 ms in a fresh process,
    against 24-35 ms here), and its `predict` checks the signature on every call (2-3 ms a
    customers night), where finpipe's models check their own inputs.
    Only the packages finpipe pins in the model's requirements are compared with this
    environment (MLflow's own check maps every installed distribution to its modules on first
    use, about a second): a difference is a warning.
    """
    from mlflow.models import Model

    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    pyfunc = Model.load(root / "MLmodel").flavors.get("python_function", {})
    loader = (pyfunc.get("config") or {}).get("loader")
    folder = (pyfunc.get("artifacts") or {}).get("model_dir", {}).get("path")
    if not loader or not folder:
        raise ScoringError(f"{uri} is not a finpipe model (no finpipe loader in its MLmodel)")
    module_name, _, class_name = loader.partition(":")
    if not trusted_model_module(module_name):
        raise ScoringError(
            f"{uri} names loader {loader!r}; finpipe loads only its own classes and those of "
            "the packages of registered domains"
        )
    model = getattr(importlib.import_module(module_name), class_name).load(root / folder)
    _warn_on_other_pins(uri, root / "requirements.txt")
    return model


def _warn_on_other_pins(uri: str, requirements: Path) -> None:
    lines = requirements.read_text().splitlines() if requirements.is_file() else []
    for line in lines:
        package, _, pinned = line.strip().partition("==")
        if not pinned:
            continue
        try:
            installed = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or installed.split("+")[0] != pinned.split("+")[0]:
            log.warning(
                "model %s was logged with %s==%s; this environment has %s",
                uri, package, pinned, installed or "none",
            )  # fmt: skip


def set_alias(settings: Settings, domain: str, alias: str, version: str) -> None:
    """Point `alias` of the domain's registered model at `version` (one registry update)."""
    mlflow.set_tracking_uri(settings.tracking_uri)
    MlflowClient().set_registered_model_alias(settings.model_name(domain), alias, str(version))


def current_alias_version(settings: Settings, domain: str, alias: str = CHAMPION) -> str | None:
    """Return the version number holding `alias`, or None."""
    mlflow.set_tracking_uri(settings.tracking_uri)
    try:
        version = MlflowClient().get_model_version_by_alias(settings.model_name(domain), alias)
    except MlflowException:
        return None
    return str(version.version)


def tag_version(settings: Settings, domain: str, version: str, key: str, value: str) -> None:
    """Set a tag on one registered version of `domain`'s model."""
    mlflow.set_tracking_uri(settings.tracking_uri)
    name = settings.model_name(check_name(domain))
    MlflowClient().set_model_version_tag(name, str(version), key, value)


def version_tags(settings: Settings, domain: str, version: str) -> dict[str, str]:
    """Return the tags of one registered version of `domain`'s model."""
    mlflow.set_tracking_uri(settings.tracking_uri)
    name = settings.model_name(check_name(domain))
    return dict(MlflowClient().get_model_version(name, str(version)).tags)


def current_champion(settings: Settings, domain: str) -> RegisteredModel | None:
    """Return the model holding `champion`, or None before the first promotion."""
    if current_alias_version(settings, domain, CHAMPION) is None:
        return None
    return load_model_version(settings, domain)


@dataclass(frozen=True)
class VersionStatus:
    """One registered version as `finpipe status` shows it."""

    version: str
    as_of: str | None  # the as-of date its training read data up to
    registered_at: str  # UTC, to the second
    promotion: str | None  # promoted, kept, or None before its promotion was decided
    # The promotion's reason in words (None on versions decided before 2026-12-07).
    reason: str | None
    refused: str | None  # why the quality floor refused it, if it did


@dataclass(frozen=True)
class RegistryStatus:
    """The champion of a domain's registered model and its latest challenger (None where
    there is none)."""

    model: str
    champion: VersionStatus | None
    challenger: VersionStatus | None


# The registry's answers to a model or an alias that does not exist (yet).
_ABSENT = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})


def registry_status(settings: Settings, domain: str) -> RegistryStatus:
    """Return the champion and the latest challenger of `domain`'s registered model (none of
    either where a local tracking database does not exist: it is not created).

    Raises TrackingUnavailable when the registry does not answer, or answers with anything
    but "no such model or alias" (a refused login, a broken database)."""
    name = settings.model_name(check_name(domain))
    database = settings.tracking_uri.removeprefix("sqlite:///")
    if database != settings.tracking_uri and not Path(database).exists():
        return RegistryStatus(name, None, None)  # nothing trained here: create no database
    mlflow.set_tracking_uri(settings.tracking_uri)
    client = MlflowClient()

    def version(alias: str) -> VersionStatus | None:
        try:
            found = client.get_model_version_by_alias(name, alias)
        except MlflowException as error:
            if error.error_code in _ABSENT:
                return None  # no such model or alias yet
            if not settings.tracking_is_local and _is_connection_error(error):
                raise TrackingUnavailable(
                    f"MLflow tracking server {settings.tracking_uri_for_display} is "
                    f"unreachable ({_short(error)})"
                ) from None
            raise TrackingUnavailable(  # a refused login, a broken database, ...
                f"MLflow at {settings.tracking_uri_for_display} did not say ({_short(error)})"
            ) from None
        registered = dt.datetime.fromtimestamp(found.creation_timestamp / 1000, dt.UTC)
        return VersionStatus(
            version=str(found.version),
            as_of=found.tags.get(AS_OF_TAG),
            registered_at=registered.isoformat(timespec="seconds"),
            promotion=found.tags.get(PROMOTION_TAG),
            reason=found.tags.get(PROMOTION_REASON_TAG),
            refused=found.tags.get(QUALITY_FLOOR_TAG),
        )

    return RegistryStatus(name, version(CHAMPION), version(CHALLENGER))


@contextlib.contextmanager
def run(name: str, *, nested: bool = False) -> Iterator[str]:
    """Start an MLflow run called `name` (nested in the active one) and yield its id; the run
    ends FAILED if the block raises."""
    with mlflow.start_run(run_name=name, nested=nested, tags=owner_tags()) as active:
        yield active.info.run_id


@contextlib.contextmanager
def child_run(name: str, parent_run_id: str) -> Iterator[str]:
    """Start an MLflow run called `name` nested under the run `parent_run_id`, in its
    experiment, and yield its id. The parent may be active in another thread (a flow's run
    while its tasks log from a thread pool): MLflow's active run is per thread."""
    experiment_id = MlflowClient().get_run(parent_run_id).info.experiment_id
    with mlflow.start_run(
        run_name=name,
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        nested=True,
        tags=owner_tags(),
    ) as active:
        yield active.info.run_id


def tag_run(key: str, value: str) -> None:
    """Set a tag on the active run."""
    mlflow.set_tag(key, value)


def log_params(params: Mapping[str, str | int | float]) -> None:
    """Log parameters to the active run."""
    mlflow.log_params(dict(params))


def log_metrics(metrics: Mapping[str, float]) -> None:
    """Log metrics to the active run."""
    mlflow.log_metrics(dict(metrics))


def log_document(document: Mapping[str, object], path: str) -> None:
    """Log `document` as a JSON artifact at `path` of the active run."""
    mlflow.log_dict(dict(document), path)


def log_table(table: pd.DataFrame, path: str) -> None:
    """Log `table` as an MLflow table artifact (JSON, shown in the UI) at `path`."""
    mlflow.log_table(table, path)


def log_epoch(row: dict) -> None:
    """Log one epoch's train and validation loss (a training loop's `on_epoch`) to the run."""
    mlflow.log_metrics(
        {"train_loss": row["train_loss"], "validation_loss": row["validation_loss"]},
        step=row["epoch"],
    )


def log_figures(figures: Mapping[str, Figure] | Iterable[tuple[str, Figure]]) -> None:
    """Log each matplotlib figure at its artifact path ({path: figure}, or (path, figure)
    pairs drawn one at a time), closing each once logged.

    pyplot keeps every figure open until closed, so a figure is closed even when its logging
    fails (a tracking server gone mid-run), and so are the mapping's figures not reached: a
    long-lived process (`finpipe serve`) would otherwise keep them for good."""
    from finpipe import plots

    pairs = list(figures.items()) if isinstance(figures, Mapping) else figures
    try:
        for path, figure in pairs:
            try:
                mlflow.log_figure(figure, path)
            finally:
                plots.close(figure)
    finally:
        if isinstance(figures, Mapping):
            for figure in figures.values():
                plots.close(figure)


def log_training_data(
    frame: pd.DataFrame, *, source: str, name: str, targets: str | None = None
) -> None:
    """Log the first 10,000 rows of `frame` as the run's training data set (schema + sample)."""
    with warnings.catch_warnings():
        # MLflow registers two local-file source types and warns that it picked one.
        warnings.simplefilter("ignore", UserWarning)
        dataset = from_pandas(frame.head(10_000), source=source, name=name, targets=targets)
    mlflow.log_input(dataset, context="training")
