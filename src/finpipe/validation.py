"""Data-quality gate: run a reviewed Great Expectations suite on a pandas batch, return a report.

The suites live as GX 1.x suite JSON in `expectations/` (installed as `finpipe.expectations`), one
file per domain, so reviewers edit rules without touching code. `validate_frame` is generic over
domains; the market-specific part is only `add_market_checks_columns`, which adds the derived
columns the market suite bounds (GX has no per-ticker lag).

GX is imported lazily and one ephemeral Data Context is kept per process: creating it and
registering a suite costs far more than validating a small batch. Validations in one process are
serialised by a lock because the cached context is shared state.

Every batch is checked by GX, every rule on every row, asking for counts only (result format
BASIC). The rules that saw unexpected rows are then run again on the same batch for the rows
themselves (SUMMARY), which the report and the quarantine need, and their results replace the
counts-only ones. Listing unexpected rows makes GX filter the whole frame once per rule, and
rules with nothing to list, most of them on most nights, do not pay for it. GX's own frame
fingerprint (a hash of every cell, more work than the whole suite in plain pandas) is switched
off: ingest identifies each delivery by the SHA-256 of its file.

Data Docs: ingest writes one small site per delivery (it travels with a quarantined batch). Every
site of a process shares one compiled copy of GX's page templates, and gets only the static file
its pages link to (the favicon), not GX's 4 MB static folder.
"""

from __future__ import annotations

import atexit
import collections
import datetime as dt
import hashlib
import importlib.resources
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.bccache
import numpy as np
import pandas as pd

from finpipe.errors import ConfigError
from finpipe.market.schema import price_column

# Offline project: GX must never try to phone home. Set before great_expectations is imported.
os.environ["GX_ANALYTICS_ENABLED"] = "false"

SAMPLE_LIMIT = 10
# Validations one process keeps for the Data Docs index page (newest first); older pages stay.
DOCS_INDEX_RESULTS = 20
# GX's static files that its Data Docs pages link to (paths under GX's render/view/static/).
DOCS_STATIC_ASSETS = ("images/favicon.ico",)
_COLUMN_KWARGS = ("column", "column_A", "column_B")
_LIST_COLUMN_KWARGS = ("column_list",)
# Expectations that check a column's presence must run precisely when the column is absent.
_NEVER_SKIPPED = frozenset({"expect_column_to_exist"})
_ISO_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# First pass: verdicts and counts only. Second pass, when a rule saw unexpected rows: samples.
_COUNTS_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": SAMPLE_LIMIT}
_SAMPLES_FORMAT = {
    "result_format": "SUMMARY",
    "partial_unexpected_count": SAMPLE_LIMIT,
    "return_unexpected_index_query": False,
}


@dataclass
class RuleResult:
    """The outcome of one expectation on one batch, in plain JSON-serialisable values."""

    rule: str
    expectation_type: str
    columns: list[str]
    success: bool
    unexpected_count: int
    unexpected_percent: float | None
    sample_rows: list[int]
    sample_values: list
    details: dict
    # The suite's key columns (meta.key_columns) of each sample row: {"date": ..., "ticker": ...}.
    sample_keys: list[dict] = field(default_factory=list)


@dataclass
class ValidationReport:
    """A batch's data-quality verdict: every rule's result, the rules skipped and why."""

    suite: str
    batch: str
    success: bool
    row_count: int
    rules: list[RuleResult]
    skipped: list[dict]
    data_docs: str | None = None
    parameters: dict = field(default_factory=dict)

    def failures(self) -> list[RuleResult]:
        """Return the rules that failed, in suite order."""
        return [rule for rule in self.rules if not rule.success]

    def to_dict(self) -> dict:
        """Return the report as a JSON-serialisable dict (the quarantine's JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> ValidationReport:
        """Return the report `to_dict` produced, e.g. read back from a quarantine JSON file."""
        fields_ = dict(payload)
        fields_["rules"] = [RuleResult(**rule) for rule in payload["rules"]]
        return cls(**fields_)

    def summary(self) -> str:
        """Return one paragraph a user can act on: each failed rule with a count, a row, a value."""
        failures = self.failures()
        skipped = f", {len(self.skipped)} skipped for absent columns" if self.skipped else ""
        head = (
            f"Batch '{self.batch}' {'FAILED' if failures else 'passed'} suite '{self.suite}' "
            f"({len(self.rules)} rules on {self.row_count:,} rows{skipped})"
        )
        if not failures:
            return head + "."
        parts = [head + f": {len(failures)} rule(s) broken."]
        parts.extend(_describe_failure(rule) for rule in failures)
        parts.append(
            f"Fix the source data and deliver it again, or, if the data is right, "
            f"review the rule in expectations/{self.suite}.json."
        )
        if self.data_docs:
            parts.append(f"Details: {self.data_docs}")
        return " ".join(parts)


def load_suite_spec(name: str) -> dict:
    """Return the reviewed suite `name` (GX 1.x suite JSON) from `finpipe.expectations`.

    Raises ConfigError when the file is missing, is not valid JSON, or is not a suite.
    """
    folder = importlib.resources.files("finpipe.expectations")
    resource = folder / f"{name}.json"
    if not resource.is_file():
        available = sorted(
            entry.name.removesuffix(".json")
            for entry in folder.iterdir()
            if entry.name.endswith(".json")
        )
        raise ConfigError(
            f"no expectation suite '{name}': expected {name}.json in expectations/; "
            f"available suites: {available}"
        )
    try:
        spec = json.loads(resource.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"expectations/{name}.json is not valid JSON (line {exc.lineno}: {exc.msg}); "
            "fix the file"
        ) from exc
    if not isinstance(spec, dict) or not isinstance(spec.get("expectations"), list):
        raise ConfigError(
            f"expectations/{name}.json is not a GX suite: it needs a 'name' and a list "
            "'expectations' of {type, kwargs, meta}"
        )
    if spec.get("name") != name:
        raise ConfigError(
            f"expectations/{name}.json declares name {spec.get('name')!r}; "
            f"set it to {name!r} so the file and the suite agree"
        )
    for position, entry in enumerate(spec["expectations"]):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("type"), str)
            and isinstance(entry.get("kwargs"), dict)
        ):
            raise ConfigError(
                f"expectations/{name}.json: expectation #{position + 1} needs a string 'type' "
                f"and a 'kwargs' object; got {str(entry)[:120]}"
            )
    rule_ids = [rule_id(expectation) for expectation in spec["expectations"]]
    duplicated = sorted({r for r in rule_ids if rule_ids.count(r) > 1})
    if duplicated:
        raise ConfigError(
            f"expectations/{name}.json has several expectations named {duplicated}; "
            "merge them so every rule has one readable id"
        )
    return spec


def rule_id(expectation: Mapping[str, Any]) -> str:
    """Return the readable id of a suite entry, e.g. `expect_column_values_to_be_between(close)`."""
    return f"{expectation['type']}({', '.join(expectation_columns(expectation))})"


def expectation_columns(expectation: Mapping[str, Any]) -> list[str]:
    """Return the columns a suite entry reads, in the order its kwargs name them."""
    kwargs = expectation.get("kwargs", {})
    columns = [kwargs[key] for key in _COLUMN_KWARGS if key in kwargs]
    for key in _LIST_COLUMN_KWARGS:
        columns.extend(kwargs.get(key, []))
    return [str(column) for column in columns]


def validate_frame(
    frame: pd.DataFrame,
    *,
    suite_name: str,
    batch_name: str,
    parameters: dict | None = None,
    data_docs_dir: Path | None = None,
    suite_spec: dict | None = None,
) -> ValidationReport:
    """Return the report of running suite `suite_name` on `frame` (its rows taken by position).

    Expectations on columns absent from `frame` are skipped and listed in `report.skipped`
    (column-existence rules are never skipped). `parameters` supplies the suite's
    `{"$PARAMETER": name}` values; a date-like value or an ISO `YYYY-MM-DD` string is read as a
    tz-naive pandas Timestamp so it compares with datetime columns. When `data_docs_dir` is given,
    GX Data Docs HTML is written there and `report.data_docs` is its index page.
    `suite_spec` runs a suite built in memory (same JSON shape, `name` equal to `suite_name`,
    e.g. from a user's config) instead of reading expectations/<suite_name>.json.

    Raises ConfigError for an unknown or invalid suite, or a missing suite parameter.
    """
    spec = load_suite_spec(suite_name) if suite_spec is None else suite_spec
    if spec.get("name") != suite_name:
        raise ConfigError(f"suite_spec is named {spec.get('name')!r}, expected {suite_name!r}")
    parameters = {key: _as_suite_parameter(value) for key, value in (parameters or {}).items()}
    _check_parameters(spec, parameters)
    batch = frame.reset_index(drop=True)  # GX reports index labels; make them positions
    present = set(map(str, batch.columns))
    kept, skipped = _split_on_columns(spec["expectations"], present)
    key_columns = [c for c in spec.get("meta", {}).get("key_columns", []) if c in present]

    with _RUNTIME_LOCK:
        runtime = _gx_runtime()
        registered = runtime.prepare(spec, kept)
        run_id = runtime.run_identifier(batch_name)
        result = registered.validation.run(
            batch_parameters={"dataframe": batch},
            expectation_parameters=parameters,
            result_format=_COUNTS_FORMAT,
            run_id=run_id,
        )
        sampled = runtime.add_samples(registered, batch, parameters, result)
        if data_docs_dir is None:
            # Nothing will render it: drop it so a long-lived process does not accumulate results.
            runtime.forget_result(suite_name, run_id, result)
            docs_index = None
        else:
            # Kept: the docs site's index page lists the newest results still held.
            if sampled:  # the store holds the counts-only result ValidationDefinition.run saved
                runtime.store_result(suite_name, run_id, result)
            docs_index = runtime.build_data_docs(
                Path(data_docs_dir), registered, suite_name, run_id, result
            )

    order = registered.rule_order()
    rules = [  # suite order, not GX's execution order
        _rule_result(registered.entries[r.expectation_config.id], r, batch, key_columns)
        for r in sorted(result.results, key=lambda r: order[r.expectation_config.id])
    ]
    return ValidationReport(
        suite=suite_name,
        batch=batch_name,
        success=bool(result.success),
        row_count=len(batch),
        rules=rules,
        skipped=skipped,
        data_docs=docs_index,
        parameters=_json_value(parameters),
    )


# --- market-specific derived columns -------------------------------------------------------------

MARKET_CHECK_COLUMNS = ("abs_log_return_1d", "abs_log_return_1d_unadjusted")


def add_market_checks_columns(
    batch: pd.DataFrame, previous_close: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Return `batch` (same rows, same order) plus the derived columns the market suite bounds.

    - `abs_log_return_1d`: |ln(p_t / p_t-1)| per ticker in date order, on `price_column(batch)`
      (adj_close when delivered, else close). A ticker's first row in the batch is compared with
      its last accepted price before that day from `previous_close` (columns ticker, date, price;
      the price must be on the same basis as the batch's price column); without one it is NaN.
      A missing or non-positive price, or a row without date or ticker, gives NaN: the not-null
      and > 0 rules report those rows instead.
    - `abs_log_return_1d_unadjusted`: the same figure, added only when returns had to come from
      the unadjusted close, so the suite's tighter split bound applies only then.

    A batch without date, ticker or close is returned unchanged: the suite reports the missing
    column. Drop MARKET_CHECK_COLUMNS before storing the batch.
    """
    if not {"date", "ticker", "close"} <= set(batch.columns):
        return batch
    price = price_column(batch)
    ordered = (
        pd.DataFrame(
            {
                "ticker": batch["ticker"].astype("string"),
                "date": batch["date"],
                "price": pd.to_numeric(batch[price], errors="coerce").astype("float64"),
            }
        )
        .set_axis(pd.RangeIndex(len(batch)))  # positions: the caller's index may repeat
        .dropna(subset=["ticker", "date"])  # rows without a key have no place in a series
        .sort_values(["ticker", "date"], kind="stable")
    )
    previous = ordered.groupby("ticker", sort=False)["price"].shift(1)
    if previous_close is not None and len(previous_close):
        first_rows = ~ordered["ticker"].duplicated()
        previous.loc[first_rows] = _last_accepted_prices(
            ordered.loc[first_rows, ["ticker", "date"]], previous_close
        )
    both_positive = (ordered["price"] > 0) & (previous > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_return = np.log(ordered["price"] / previous).abs()
    log_return = log_return.where(both_positive).astype("float64")

    result = batch.copy()
    result["abs_log_return_1d"] = log_return.reindex(pd.RangeIndex(len(batch))).to_numpy()
    if price == "close":
        result["abs_log_return_1d_unadjusted"] = result["abs_log_return_1d"]
    else:
        result = result.drop(columns="abs_log_return_1d_unadjusted", errors="ignore")
    return result


def _last_accepted_prices(first_rows: pd.DataFrame, previous_close: pd.DataFrame) -> pd.Series:
    """Return, per row of `first_rows`, the ticker's last `previous_close` price strictly before
    that row's date (NaN when there is none), indexed like `first_rows`."""
    missing = {"ticker", "date", "price"} - set(previous_close.columns)
    if missing:
        raise ValueError(
            f"previous_close needs columns ticker, date, price; {sorted(missing)} missing "
            f"(got {list(previous_close.columns)})"
        )
    prior = pd.DataFrame(
        {
            "ticker": previous_close["ticker"].astype("string").str.strip().str.upper(),
            "date": pd.to_datetime(previous_close["date"]).astype("datetime64[ns]"),
            "previous_price": previous_close["price"].astype("float64"),
        }
    ).dropna(subset=["date", "previous_price"])
    left = first_rows.assign(
        row=first_rows.index, date=first_rows["date"].astype("datetime64[ns]")
    ).dropna(subset=["ticker", "date"])
    matched = pd.merge_asof(
        left.sort_values("date"),
        prior.sort_values("date"),
        on="date",
        by="ticker",
        allow_exact_matches=False,
        direction="backward",
    )
    return matched.set_index("row")["previous_price"].reindex(first_rows.index)


# --- Great Expectations runtime (one per process) ------------------------------------------------

_RUNTIME_LOCK = threading.Lock()


@dataclass(frozen=True)
class _RegisteredSuite:
    """A suite registered in the GX context, with the reviewed entry behind each expectation."""

    signature: str  # the JSON of the entries and meta it was built from
    validation: Any  # gx.ValidationDefinition
    entries: dict[str, dict]  # GX expectation id -> suite entry

    def rule_order(self) -> dict[str, int]:
        """Return each GX expectation id's position in the suite file."""
        return {expectation_id: i for i, expectation_id in enumerate(self.entries)}


class _GxRuntime:
    """The process's ephemeral GX context and the suites, assets and docs sites it holds."""

    def __init__(self) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        self._gx = gx
        # In-memory stores and no default docs site: the plain ephemeral context registers a
        # `local_site` in a temp folder, and Data Docs must only ever land where asked.
        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            progress_bars=ProgressBarsConfig(globally=False),
            analytics_enabled=False,
        )
        _skip_frame_fingerprint()
        self.context = gx.get_context(mode="ephemeral", project_config=config)
        self.datasource = self.context.data_sources.add_pandas("finpipe")
        self._suites: dict[str, _RegisteredSuite] = {}
        self._site: tuple[Path, Any] | None = None  # the last docs folder and its SiteBuilder
        self._suite_pages: set[tuple[Path, str]] = set()
        self._templates = _TemplateCode()
        self._static: Path | None = None
        # Result keys rendered into the last docs folder, oldest first.
        self._held: collections.deque = collections.deque()

    def prepare(self, spec: dict, kept: list[dict]) -> _RegisteredSuite:
        """Return the registered suite for `spec` restricted to `kept`, rebuilding it only when
        the expectations differ from the cached ones."""
        name = spec["name"]
        signature = json.dumps([spec.get("meta"), spec.get("notes"), kept], sort_keys=True)
        cached = self._suites.get(name)
        if cached and cached.signature == signature:
            return cached
        # Build first: a bad entry raises ConfigError before the registered suite is touched.
        expectations = [_build_expectation(name, entry) for entry in kept]
        if cached:
            del self._suites[name]
            self.context.validation_definitions.delete(name)
            self.context.suites.delete(name)
        suite = self.context.suites.add(
            self._gx.ExpectationSuite(
                name=name,
                expectations=expectations,
                meta=dict(spec.get("meta") or {}),
                notes=spec.get("notes"),
            )
        )
        registered_types = [e.expectation_type for e in suite.expectations]
        if registered_types != [entry["type"] for entry in kept]:
            raise RuntimeError(f"GX registered suite '{name}' with different expectations")
        try:
            asset = self.datasource.get_asset(name)
        except LookupError:
            asset = self.datasource.add_dataframe_asset(name)
            asset.add_batch_definition_whole_dataframe("whole_dataframe")
        validation = self.context.validation_definitions.add(
            self._gx.ValidationDefinition(
                name=name, data=asset.get_batch_definition("whole_dataframe"), suite=suite
            )
        )
        registered = _RegisteredSuite(
            signature=signature,
            validation=validation,
            entries={e.id: entry for e, entry in zip(suite.expectations, kept, strict=True)},
        )
        self._suites[name] = registered
        return registered

    def run_identifier(self, batch_name: str) -> Any:
        """Return a GX run id named after the batch (it names the Data Docs page's folder)."""
        from great_expectations.core.run_identifier import RunIdentifier

        return RunIdentifier(
            run_name=re.sub(r"[^\w.-]+", "_", batch_name) or "batch",
            run_time=dt.datetime.now(dt.UTC),
        )

    def build_data_docs(
        self, folder: Path, registered: _RegisteredSuite, suite_name: str, run_id: Any, result: Any
    ) -> str:
        """Return the index page of the Data Docs site in `folder` after rendering `result`.

        The site builder of the last folder is kept, so a run of batches into one folder compiles
        GX's page templates once, not once per batch; the suite's page is rendered when the folder
        first gets this suite (or a changed one). The index lists the validations this process
        holds for that folder, the newest DOCS_INDEX_RESULTS: listing every one read them all
        back for each new page, which made a long ingest quadratic. Results rendered into another
        folder are dropped, so ingest's one-folder-per-batch index lists its own batch. Every
        page stays on disk.
        """
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
        )

        folder = folder.expanduser().resolve()
        if self._site is None or self._site[0] != folder:
            while self._held:  # every held result was rendered into the previous folder
                self._forget(self._held.popleft())
            self._site = (folder, self._site_builder(folder))
        key = self._result_key(suite_name, run_id, result)
        resources = [key]
        suite_page = folder / "expectations" / f"{suite_name}.html"
        if (folder, registered.signature) not in self._suite_pages or not suite_page.is_file():
            resources.append(ExpectationSuiteIdentifier(name=suite_name))
        self._held.append(key)
        while len(self._held) > DOCS_INDEX_RESULTS:
            self._forget(self._held.popleft())
        builder = self._site[1]
        # SiteBuilder.build, but its index keeps pages it holds no result for: another process's
        # batches, or this one's beyond the newest (GX's default deletes them).
        for section in builder.site_section_builders.values():
            section.build(resource_identifiers=resources)
        if not (folder / "static").is_dir():
            builder.target_store.copy_static_assets(str(self._static_assets()))
        builder.site_index_builder.build(skip_and_clean_missing=False)
        self._suite_pages.add((folder, registered.signature))
        index = folder / "index.html"
        if not index.is_file():
            raise RuntimeError(f"GX did not write the Data Docs index page {index}")
        return str(index)

    def _static_assets(self) -> Path:
        """Return a folder `static/` holding only the GX static files its pages link to.

        GX's own copy puts 4 MB in every site (fonts, how-to GIFs) of which the pages use the
        favicon alone (styles are inlined, the rest comes from CDNs); ingest writes one site per
        delivery, so that was 4 MB a batch. tests/test_validation.py checks that every static
        file a page links to is in the site.
        """
        if self._static is None:
            import great_expectations

            source = Path(great_expectations.__file__).parent / "render" / "view" / "static"
            staging = tempfile.mkdtemp(prefix="finpipe-gx-static-")
            atexit.register(shutil.rmtree, staging, True)
            self._static = Path(staging) / "static"
            for name in DOCS_STATIC_ASSETS:
                target = self._static / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / name, target)
        return self._static

    def _site_builder(self, folder: Path) -> Any:
        """Return a GX SiteBuilder writing into `folder`, configured as a docs site would be.

        Its page views share the process's compiled templates (`_TemplateCode`): each builder
        has Jinja environments of its own, and compiling GX's templates again for every new
        folder (ingest writes one per delivery) was most of a Data Docs page's cost.
        """
        builder = self._new_site_builder(folder)
        views = [s.view_class for s in builder.site_section_builders.values()]
        for view in [*views, builder.site_index_builder.view_class]:
            view.env.bytecode_cache = self._templates
        return builder

    def _new_site_builder(self, folder: Path) -> Any:
        from great_expectations.data_context.util import instantiate_class_from_config

        return instantiate_class_from_config(
            config={
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(folder),
                },
                "site_index_builder": {
                    "class_name": "DefaultSiteIndexBuilder",
                    "show_cta_footer": False,
                },
            },
            runtime_environment={
                "data_context": self.context,
                "root_directory": None,
                "site_name": "finpipe_" + hashlib.sha1(str(folder).encode()).hexdigest()[:12],
            },
            config_defaults={
                "class_name": "SiteBuilder",
                "module_name": "great_expectations.render.renderer.site_builder",
            },
        )

    def add_samples(
        self,
        registered: _RegisteredSuite,
        batch: pd.DataFrame,
        parameters: dict,
        result: Any,
    ) -> bool:
        """Re-run with SUMMARY each rule of the counts-only `result` that saw unexpected rows and
        put its result in place of the counts-only one; return whether any rule was re-run."""
        needing = [k for k, outcome in enumerate(result.results) if _needs_samples(outcome)]
        if not needing:
            return False
        expectations = {e.id: e for e in registered.validation.suite.expectations}
        gx_batch = registered.validation.data.get_batch(batch_parameters={"dataframe": batch})
        for k in needing:
            counted = result.results[k]
            detailed = gx_batch.validate(
                expectations[counted.expectation_config.id],
                result_format=_SAMPLES_FORMAT,
                expectation_parameters=parameters,
            )
            if detailed.success != counted.success:
                raise RuntimeError(
                    f"GX gave {counted.expectation_config.type} two verdicts on one batch"
                )
            result.results[k] = detailed
        return True

    def store_result(self, suite_name: str, run_id: Any, result: Any) -> None:
        """Put `result` in the validation results store in place of what it holds for the run."""
        self.context.validation_results_store.set(
            self._result_key(suite_name, run_id, result), result
        )

    def forget_result(self, suite_name: str, run_id: Any, result: Any) -> None:
        """Drop `result` from the in-memory validation results store."""
        self._forget(self._result_key(suite_name, run_id, result))

    def _forget(self, key: Any) -> None:
        store = self.context.validation_results_store
        if store.has_key(key):
            store.remove_key(key)

    @staticmethod
    def _result_key(suite_name: str, run_id: Any, result: Any) -> Any:
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
            ValidationResultIdentifier,
        )

        return ValidationResultIdentifier(
            expectation_suite_identifier=ExpectationSuiteIdentifier(name=suite_name),
            run_id=run_id,
            batch_identifier=result.batch_id,
        )


class _TemplateCode(jinja2.BytecodeCache):
    """Compiled Jinja templates kept in memory, shared by every Environment that uses it.

    Keyed by template, and checked against the checksum of its source, as Jinja's own file
    and memcached caches do; code objects are kept as they are (nothing is written).
    """

    def __init__(self) -> None:
        self._code: dict[str, tuple[str, Any]] = {}

    def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        checksum, code = self._code.get(bucket.key, (None, None))
        if checksum == bucket.checksum:
            bucket.code = code

    def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        self._code[bucket.key] = (bucket.checksum, bucket.code)


@cache
def _gx_runtime() -> _GxRuntime:
    logging.getLogger("great_expectations.render.renderer.site_builder").addFilter(
        _quiet_pages_without_results
    )
    return _GxRuntime()


def _quiet_pages_without_results(record: logging.LogRecord) -> bool:
    """Drop GX's warning for each Data Docs page it holds no result for: by design here (see
    `_GxRuntime.build_data_docs`), one line per kept page and batch would bury real warnings."""
    return not str(record.msg).startswith("Validation result not found")


def _skip_frame_fingerprint() -> None:
    """Stop GX hashing every cell of each batch for its `pandas_data_fingerprint` batch marker.

    The marker is informational (GX already leaves it out for frames over HASH_THRESHOLD bytes,
    1 GB); ingest keys every delivery on its file's SHA-256 instead. The hash costs more than the
    market suite's rules themselves on a 2M-row batch. Should a GX release drop the threshold, the
    fingerprint comes back, which costs time only; tests/test_validation.py notices it.
    """
    from great_expectations.execution_engine import pandas_execution_engine

    if hasattr(pandas_execution_engine, "HASH_THRESHOLD"):
        pandas_execution_engine.HASH_THRESHOLD = 0


def _build_expectation(suite_name: str, entry: dict) -> Any:
    """Return the GX Expectation for a suite entry; ConfigError names the entry when it is bad."""
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    try:
        return ExpectationConfiguration(**entry).to_domain_obj()
    except Exception as exc:  # GX raises several unrelated types for a bad entry
        raise ConfigError(
            f"expectations/{suite_name}.json: {rule_id(entry)} is not a valid GX expectation "
            f"({type(exc).__name__}: {exc}); fix its type or kwargs"
        ) from exc


# --- pure helpers --------------------------------------------------------------------------------


def _needs_samples(outcome: Any) -> bool:
    """Return whether one rule's counts-only GX result must be re-run for its sample rows: it saw
    unexpected rows (failing, or passing under `mostly`)."""
    return bool((outcome.result or {}).get("unexpected_count"))


def _split_on_columns(
    expectations: Sequence[dict], present: set[str]
) -> tuple[list[dict], list[dict]]:
    """Return (expectations to run, skipped entries) given the columns present in the batch."""
    kept: list[dict] = []
    skipped: list[dict] = []
    for entry in expectations:
        columns = expectation_columns(entry)
        missing = [column for column in columns if column not in present]
        if missing and entry["type"] not in _NEVER_SKIPPED:
            skipped.append(
                {
                    "rule": rule_id(entry),
                    "expectation_type": entry["type"],
                    "columns": columns,
                    "missing_columns": missing,
                    "reason": f"column(s) {missing} not in the batch",
                }
            )
        else:
            kept.append(entry)
    return kept, skipped


def _suite_parameter_names(value: Any) -> set[str]:
    """Return the `$PARAMETER` names referenced anywhere inside `value`."""
    if isinstance(value, Mapping):
        if "$PARAMETER" in value:
            return {str(value["$PARAMETER"])}
        return set().union(*(_suite_parameter_names(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_suite_parameter_names(v) for v in value))
    return set()


def _check_parameters(spec: dict, parameters: Mapping[str, Any]) -> None:
    needed = _suite_parameter_names(spec["expectations"])
    missing = sorted(needed - set(parameters))
    if missing:
        raise ConfigError(
            f"suite '{spec['name']}' needs parameter(s) {missing}: pass "
            f"parameters={{{', '.join(f'{name!r}: ...' for name in missing)}}} to validate_frame"
        )


def _as_suite_parameter(value: Any) -> Any:
    """Return `value` as GX can compare it: date-likes become tz-naive pandas Timestamps."""
    if isinstance(value, str) and _ISO_DAY.match(value):
        return pd.Timestamp(value)
    if isinstance(value, dt.date | np.datetime64):
        stamp = pd.Timestamp(value)
        return stamp.tz_convert("UTC").tz_localize(None) if stamp.tzinfo else stamp
    return value


def _rule_result(
    entry: dict, outcome: Any, batch: pd.DataFrame, key_columns: list[str]
) -> RuleResult:
    """Return the RuleResult of one GX ExpectationValidationResult."""
    result = dict(outcome.result or {})
    kwargs = {k: v for k, v in outcome.expectation_config.kwargs.items() if k != "batch_id"}
    details: dict[str, Any] = {"kwargs": _json_value(kwargs)}
    if "observed_value" in result:
        details["observed_value"] = _json_value(result["observed_value"])
    exception = outcome.exception_info or {}
    if exception.get("raised_exception"):
        details["exception"] = str(exception.get("exception_message"))
    rows = [int(i) for i in result.get("partial_unexpected_index_list") or []][:SAMPLE_LIMIT]
    values = list(result.get("partial_unexpected_list") or [])[:SAMPLE_LIMIT]
    keys = (
        _json_value(batch.iloc[rows][key_columns].to_dict("records"))
        if rows and key_columns
        else []
    )
    percent = result.get("unexpected_percent")
    return RuleResult(
        rule=rule_id(entry),
        expectation_type=entry["type"],
        columns=expectation_columns(entry),
        success=bool(outcome.success),
        unexpected_count=int(result.get("unexpected_count") or 0),
        unexpected_percent=None if percent is None else float(percent),
        sample_rows=rows,
        sample_values=_json_value(values),
        details=details,
        sample_keys=keys,
    )


def _describe_failure(rule: RuleResult) -> str:
    """Return one sentence on a failed rule: what broke, how often, one row and value."""
    if "exception" in rule.details:
        return f"{rule.rule} could not be evaluated: {rule.details['exception']}."
    if rule.unexpected_count == 0:
        observed = rule.details.get("observed_value", "column absent")
        return f"{rule.rule} failed (observed: {observed})."
    share = "" if rule.unexpected_percent is None else f" ({rule.unexpected_percent:.3g}%)"
    text = f"{rule.rule}: {rule.unexpected_count:,} unexpected row(s){share}"
    if rule.sample_rows:
        keys = rule.sample_keys[0] if rule.sample_keys else {}
        where = f" ({', '.join(f'{k}={v}' for k, v in keys.items())})" if keys else ""
        text += f", e.g. row {rule.sample_rows[0]}{where} value {_short(rule.sample_values[0])}"
    return text + "."


def _short(value: Any) -> str:
    """Return a JSON sample value as a short readable string (floats to 6 significant digits)."""
    if value is None:
        return "null (missing)"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_short(v)}" for k, v in value.items()) + "}"
    return repr(value) if isinstance(value, str) else str(value)


def _json_value(value: Any) -> Any:
    """Return `value` with numpy/pandas scalars made plain; NaN and NaT become None, midnight
    timestamps a `YYYY-MM-DD` string, other timestamps ISO 8601, infinities "inf"/"-inf",
    tuples lists."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_json_value(v) for v in value]
    if isinstance(value, np.datetime64):
        value = pd.Timestamp(value)
    elif isinstance(value, np.generic):
        value = value.item()
    if value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return value if math.isfinite(value) else str(value)  # JSON has no infinity
    if isinstance(value, dt.datetime):
        stamp = pd.Timestamp(value)
        if stamp.tzinfo is None and stamp == stamp.normalize():
            return stamp.strftime("%Y-%m-%d")
        return stamp.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)
