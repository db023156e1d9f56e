"""Great Expectations at the edge: the one module that imports `great_expectations`.

`run_suite` runs a suite's expectations on a pandas batch and returns plain outcomes, rule by
rule in suite order; `finpipe.validation` turns them into the report. GX is imported lazily and
one ephemeral Data Context is kept per process: creating it and registering a suite costs far
more than validating a small batch. Runs in one process are serialised by a lock because the
cached context is shared state.

Every batch is checked by GX, every rule on every row, asking for counts only (result format
BASIC). The rules that saw unexpected rows are then run again on the same batch for the rows
themselves (SUMMARY), which the report and the quarantine need, and their results replace the
counts-only ones. Listing unexpected rows makes GX filter the whole frame once per rule, and
rules with nothing to list, most of them on most nights, do not pay for it.

Data Docs: ingest writes one small site per delivery (it travels with a quarantined batch). Every
site of a process shares one compiled copy of GX's page templates. The pages work offline: they
load local copies of the scripts, styles and fonts GX takes from CDNs, and each site gets the
files its pages link to (`finpipe.docs_assets`), not GX's 4 MB static folder.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.bccache
import pandas as pd

from finpipe import docs_assets

# Rows GX lists per rule that saw unexpected rows (the report's samples).
SAMPLE_LIMIT = 10
# Validations one process keeps for the Data Docs index page (newest first); older pages stay.
DOCS_INDEX_RESULTS = 20
# First pass: verdicts and counts only. Second pass, when a rule saw unexpected rows: samples.
_COUNTS_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": SAMPLE_LIMIT}
_SAMPLES_FORMAT = {
    "result_format": "SUMMARY",
    "partial_unexpected_count": SAMPLE_LIMIT,
    "return_unexpected_index_query": False,
}


class InvalidExpectation(ValueError):
    """A suite entry GX cannot build (unknown type, bad kwargs); `cause` is GX's error."""

    def __init__(self, entry: dict, cause: Exception) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.entry = entry
        self.cause = cause


@dataclass(frozen=True)
class RuleOutcome:
    """One expectation's result on one batch, as GX gave it, in plain values."""

    entry: dict  # the suite entry that was run
    success: bool
    result: dict  # GX's `result`: unexpected_count/percent, partial_unexpected_*, observed_value
    kwargs: dict  # the kwargs GX ran it with (parameters resolved), without GX's batch_id
    exception: str | None  # GX's message when the rule could not be evaluated


@dataclass(frozen=True)
class SuiteRun:
    """A suite's run on one batch: the verdict, every rule's outcome in suite order, the docs."""

    success: bool
    outcomes: list[RuleOutcome]
    data_docs: str | None  # the Data Docs index page, when a folder was given


def run_suite(
    batch: pd.DataFrame,
    spec: Mapping[str, Any],
    kept: Sequence[dict],
    *,
    parameters: Mapping[str, Any],
    batch_name: str,
    data_docs_dir: Path | None,
) -> SuiteRun:
    """Return the outcome of the entries `kept` of suite `spec` on `batch` (rows by position).

    `parameters` are the suite's `$PARAMETER` values, ready for GX. When `data_docs_dir` is
    given, a Data Docs site is written there (see `_GxRuntime.build_data_docs`).

    Raises InvalidExpectation for an entry GX cannot build.
    """
    name = spec["name"]
    with _RUNTIME_LOCK:
        runtime = _gx_runtime()
        registered = runtime.prepare(spec, list(kept))
        run_id = runtime.run_identifier(batch_name)
        result = registered.validation.run(
            batch_parameters={"dataframe": batch},
            expectation_parameters=dict(parameters),
            result_format=_COUNTS_FORMAT,
            run_id=run_id,
        )
        sampled = runtime.add_samples(registered, batch, dict(parameters), result)
        if data_docs_dir is None:
            # Nothing will render it: drop it so a long-lived process does not accumulate results.
            runtime.forget_result(name, run_id, result)
            docs_index = None
        else:
            # Kept: the docs site's index page lists the newest results still held.
            if sampled:  # the store holds the counts-only result ValidationDefinition.run saved
                runtime.store_result(name, run_id, result)
            docs_index = runtime.build_data_docs(
                Path(data_docs_dir), registered, name, run_id, result
            )
    order = registered.rule_order()
    outcomes = [  # suite order, not GX's execution order
        _outcome(registered.entries[r.expectation_config.id], r)
        for r in sorted(result.results, key=lambda r: order[r.expectation_config.id])
    ]
    return SuiteRun(success=bool(result.success), outcomes=outcomes, data_docs=docs_index)


def _outcome(entry: dict, gx_result: Any) -> RuleOutcome:
    """Return the RuleOutcome of one GX ExpectationValidationResult."""
    exception = gx_result.exception_info or {}
    return RuleOutcome(
        entry=entry,
        success=bool(gx_result.success),
        result=dict(gx_result.result or {}),
        kwargs={k: v for k, v in gx_result.expectation_config.kwargs.items() if k != "batch_id"},
        exception=str(exception.get("exception_message"))
        if exception.get("raised_exception")
        else None,
    )


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
        self.context = gx.get_context(mode="ephemeral", project_config=config)
        self.datasource = self.context.data_sources.add_pandas("finpipe")
        self._suites: dict[str, _RegisteredSuite] = {}
        self._docs_folder: Path | None = None  # the folder the held results were rendered into
        self._suite_pages: set[tuple[Path, str]] = set()
        self._templates = _TemplateCode()
        # The local files the pages link to instead of CDNs; GX's static folder has the favicon.
        self._assets = docs_assets.SiteAssets(
            Path(gx.__file__).parent / "render" / "view" / "static"
        )
        # Result keys rendered into the last docs folder, oldest first.
        self._held: collections.deque = collections.deque()

    def prepare(self, spec: Mapping[str, Any], kept: list[dict]) -> _RegisteredSuite:
        """Return the registered suite for `spec` restricted to `kept`, rebuilding it only when
        the expectations differ from the cached ones."""
        name = spec["name"]
        signature = json.dumps([spec.get("meta"), spec.get("notes"), kept], sort_keys=True)
        cached = self._suites.get(name)
        if cached and cached.signature == signature:
            return cached
        # Build first: a bad entry raises InvalidExpectation before the registered suite is touched.
        expectations = [_build_expectation(entry) for entry in kept]
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
            entries={str(e.id): entry for e, entry in zip(suite.expectations, kept, strict=True)},
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

        Each call builds a site builder (cheap: the templates are compiled once per process, see
        `_site_builder`); the suite's page is rendered when the folder first gets this suite (or a
        changed one). The index lists the validations this process
        holds for that folder, the newest DOCS_INDEX_RESULTS: listing every one read them all
        back for each new page, which made a long ingest quadratic. Results rendered into another
        folder are dropped, so ingest's one-folder-per-batch index lists its own batch. Every
        page stays on disk.
        """
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
        )

        folder = folder.expanduser().resolve()
        if folder != self._docs_folder:
            while self._held:  # every held result was rendered into the previous folder
                self._forget(self._held.popleft())
            self._docs_folder = folder
        key = self._result_key(suite_name, run_id, result)
        resources = [key]
        suite_page = folder / "expectations" / f"{suite_name}.html"
        if (folder, registered.signature) not in self._suite_pages or not suite_page.is_file():
            resources.append(ExpectationSuiteIdentifier(name=suite_name))
        self._held.append(key)
        while len(self._held) > DOCS_INDEX_RESULTS:
            self._forget(self._held.popleft())
        builder = self._site_builder(folder)
        # SiteBuilder.build, but its index keeps pages it holds no result for: another process's
        # batches, or this one's beyond the newest (GX's default deletes them).
        for section in builder.site_section_builders.values():
            section.build(resource_identifiers=resources)
        builder.site_index_builder.build(skip_and_clean_missing=False)
        self._assets.install(folder / "static")  # what the pages rendered now link to
        self._suite_pages.add((folder, registered.signature))
        index = folder / "index.html"
        if not index.is_file():
            raise RuntimeError(f"GX did not write the Data Docs index page {index}")
        return str(index)

    def _site_builder(self, folder: Path) -> Any:
        """Return a GX SiteBuilder writing into `folder`, configured as a docs site would be.

        Its page views share the process's compiled templates (`_TemplateCode`): each builder
        has Jinja environments of its own, and compiling GX's templates again for every new
        folder (ingest writes one per delivery) was most of a Data Docs page's cost. It pays on
        the first site already (the views share templates): a market night's one 50-row file
        validated in a fresh process in 0.62 s with it, 0.83 s without (2026-12-04).
        """
        builder = self._new_site_builder(folder)
        views = [s.view_class for s in builder.site_section_builders.values()]
        for view in [*views, builder.site_index_builder.view_class]:
            view.env.bytecode_cache = self._templates
            self._assets.attach(view.env)  # the templates, with local copies for CDN assets
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


def _build_expectation(entry: dict) -> Any:
    """Return the GX Expectation for a suite entry; InvalidExpectation when it is bad."""
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    try:
        return ExpectationConfiguration(**entry).to_domain_obj()
    except Exception as exc:  # GX raises several unrelated types for a bad entry
        raise InvalidExpectation(entry, exc) from exc


def _needs_samples(outcome: Any) -> bool:
    """Return whether one rule's counts-only GX result must be re-run for its sample rows: it saw
    unexpected rows (failing, or passing under `mostly`)."""
    return bool((outcome.result or {}).get("unexpected_count"))
