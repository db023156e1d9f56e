"""Data-quality gate: run a reviewed Great Expectations suite on a pandas batch, return a report.

The suites live as GX 1.x suite JSON in `expectations/` (installed as `finpipe.expectations`), one
file per domain, so reviewers edit rules without touching code. A domain defined outside finpipe,
or one whose suite is built from a user's config (credit), gives its suite in memory instead,
through its raw contract's `suite_spec`; messages then name that suite, not a file it does not
have (`suite_location`). `validate_frame` is generic over domains: a domain that bounds derived
figures (the market's daily return) adds those columns before validation, through its raw
contract. GX itself runs in `finpipe.gx_runtime`; this module loads suites, decides which rules
apply, and turns GX's outcomes into the `ValidationReport` the quarantine keeps and the user
reads.
"""

from __future__ import annotations

import datetime as dt
import importlib.resources
import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from finpipe.errors import ConfigError
from finpipe.gx_runtime import SAMPLE_LIMIT, InvalidExpectation, RuleOutcome, run_suite
from finpipe.text import counted, sentence

_COLUMN_KWARGS = ("column", "column_A", "column_B")
_LIST_COLUMN_KWARGS = ("column_list",)
# Expectations that check a column's presence must run precisely when the column is absent.
_NEVER_SKIPPED = frozenset({"expect_column_to_exist"})
_ISO_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
ERROR, WARNING = "error", "warning"  # a rule's severity (the suite entry's meta.severity)


@dataclass
class RuleResult:
    """The outcome of one expectation on one batch, in plain JSON-serialisable values; or of a
    rule ingest checks outside the suite (`parseable_values`, `readable_file`,
    `duplicate_key_across_batches`, ...), which has no expectation type and says what it found
    in `message`."""

    rule: str
    expectation_type: str | None
    columns: list[str]
    success: bool
    unexpected_count: int
    unexpected_percent: float | None
    sample_rows: list[int]
    sample_values: list
    details: dict
    # The suite's key columns (meta.key_columns) of each sample row: {"date": ..., "ticker": ...}.
    sample_keys: list[dict] = field(default_factory=list)
    # "error": a broken rule rejects the batch; "warning": it is recorded, the batch accepted.
    severity: str = "error"
    # What the user can do about a break of this rule (the suite entry's meta.advice).
    advice: str | None = None
    # What a rule ingest checks outside the suite says about its rows; None for a suite rule.
    message: str | None = None


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
    # Where the suite's rules are defined, in words (`suite_location`); None: the file
    # expectations/<suite>.json (and every report written before this was recorded).
    suite_source: str | None = None
    # The delivered file the batch was read from (ingest records it); None for a frame.
    source: str | None = None

    def failures(self) -> list[RuleResult]:
        """Return the error rules that failed (they reject the batch), in suite order."""
        return [r for r in self.rules if not r.success and r.severity == ERROR]

    def warnings(self) -> list[RuleResult]:
        """Return the warning rules that failed (recorded; the batch is accepted)."""
        return [r for r in self.rules if not r.success and r.severity == WARNING]

    def renumbered(self, rows: Sequence[int]) -> ValidationReport:
        """Return the report with each sample row `i` (a position in the validated frame)
        reported as `rows[i]`: its row in the delivered file, when rows were set aside first."""
        rules = [replace(r, sample_rows=[int(rows[i]) for i in r.sample_rows]) for r in self.rules]
        return replace(self, rules=rules)

    def to_dict(self) -> dict:
        """Return the report as a JSON-serialisable dict (the quarantine's JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> ValidationReport:
        """Return the report `payload` holds: what `to_dict` produced, or a quarantined batch's
        report.json as ingest writes it (its `source`, the rules it checks outside the suite;
        a file refused before the suite ran has no row count: 0 rows were validated)."""
        fields_ = {"row_count": 0, "skipped": [], **payload}
        fields_["rules"] = [
            RuleResult(**{**_outside_rule_defaults(), **r}) for r in payload["rules"]
        ]
        return cls(**fields_)

    def summary(self, also_broken: Sequence[str] = ()) -> str:
        """Return one paragraph a user can act on: each failed rule with a count, a row, a value
        (then `also_broken`: one sentence per rule checked outside the suite, counted among
        the broken ones), what to do, and
        where the Data Docs are."""
        failures = self.failures()
        absent = [entry for entry in self.skipped if not entry.get("derived")]
        skipped = f", {len(absent)} skipped for absent columns" if absent else ""
        head = (
            f"Batch '{self.batch}' {'FAILED' if failures else 'passed'} suite '{self.suite}' "
            f"({counted(len(self.rules), 'rule')} on {counted(self.row_count, 'row')}{skipped})"
        )
        warnings = self.warnings()
        verdict = "data accepted" if not failures else "which alone would not reject it"
        noted = [f"{counted(len(warnings), 'warning')}, {verdict}:"] if warnings else []
        noted.extend(describe_rule_break(rule) for rule in warnings)
        if not failures:
            return " ".join([head + ("." if not warnings else ";"), *noted])
        parts = [head + f": {counted(len(failures) + len(also_broken), 'rule')} broken."]
        parts.extend(describe_rule_break(rule) for rule in failures)
        parts.extend(also_broken)
        parts.extend(dict.fromkeys(r.advice for r in failures if r.advice))
        parts.extend(noted)
        parts.append(
            f"Fix the source data and deliver it again, or, if the data is right, "
            f"review the rule in {self.suite_source or suite_location(self.suite)}."
        )
        if self.data_docs:
            parts.append(f"Details: {self.data_docs}")
        return " ".join(parts)


def _outside_rule_defaults() -> dict[str, Any]:
    """Return the fields a rule ingest checks outside the suite may leave out of its entry in
    report.json (a file that could not be read names no column, row or value)."""
    return {
        "expectation_type": None,
        "columns": [],
        "unexpected_count": 0,
        "unexpected_percent": None,
        "sample_rows": [],
        "sample_values": [],
        "details": {},
    }


def suite_location(name: str, spec: Mapping[str, Any] | None = None) -> str:
    """Return where the rules of suite `name` are defined, for a message: the file
    expectations/<name>.json, or, for a suite a domain builds in memory (`spec`, from its raw
    contract's `suite_spec`), its `meta.defined_in` (where its user edits the rules, e.g. a
    loan-book config), or else, e.g. "the toy domain's suite 'toy_rows' (its contract's
    suite_spec)": the domain as the suite's `meta.domain` names it."""
    if spec is None:
        return f"expectations/{name}.json"
    if (spec.get("meta") or {}).get("defined_in"):  # where its user edits the rules
        return str(spec["meta"]["defined_in"])
    domain = (spec.get("meta") or {}).get("domain")
    whose = f"the {domain} domain's suite" if domain else "the suite"
    return f"{whose} '{name}' (its contract's suite_spec)"


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
    for expectation in spec["expectations"]:
        rule_severity(expectation, name)
    rule_ids = [rule_id(expectation) for expectation in spec["expectations"]]
    duplicated = sorted({r for r in rule_ids if rule_ids.count(r) > 1})
    if duplicated:
        raise ConfigError(
            f"expectations/{name}.json has several expectations named {duplicated}; "
            "merge them so every rule has one readable id"
        )
    return spec


def rule_id(expectation: Mapping[str, Any]) -> str:
    """Return the readable id of a suite entry: its `meta.id` when the suite names it (two rules
    on one column need names), else e.g. `expect_column_values_to_be_between(close)`."""
    named = (expectation.get("meta") or {}).get("id")
    if isinstance(named, str) and named:
        return named
    return f"{expectation['type']}({', '.join(expectation_columns(expectation))})"


def rule_severity(expectation: Mapping[str, Any], suite: str, location: str | None = None) -> str:
    """Return a suite entry's `meta.severity`: "error" (the default) or "warning". `location`
    names the suite in the error (`suite_location`; default: its file in expectations/)."""
    severity = (expectation.get("meta") or {}).get("severity", ERROR)
    if severity not in (ERROR, WARNING):
        raise ConfigError(
            f"{location or suite_location(suite)}: {rule_id(expectation)} has severity "
            f"{severity!r}; use {ERROR!r} (a break rejects the batch) or {WARNING!r} "
            "(recorded, accepted)"
        )
    return severity


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
    location = suite_location(suite_name, suite_spec)
    if spec.get("name") != suite_name:
        raise ConfigError(f"suite_spec is named {spec.get('name')!r}, expected {suite_name!r}")
    parameters = {key: _as_suite_parameter(value) for key, value in (parameters or {}).items()}
    _check_parameters(spec, parameters)
    batch = frame.reset_index(drop=True)  # GX reports index labels; make them positions
    present = set(map(str, batch.columns))
    derived = set(spec.get("meta", {}).get("derived_columns", {}))
    kept, skipped = _split_on_columns(spec["expectations"], present, derived)
    key_columns = [c for c in spec.get("meta", {}).get("key_columns", []) if c in present]

    try:
        run = run_suite(
            batch,
            spec,
            kept,
            parameters=parameters,
            batch_name=batch_name,
            data_docs_dir=data_docs_dir,
        )
    except InvalidExpectation as bad:
        raise ConfigError(
            f"{location}: {rule_id(bad.entry)} is not a valid GX expectation "
            f"({bad}); fix its type or kwargs"
        ) from bad.cause
    rules = [
        _rule_result(outcome, batch, key_columns, suite_name, location) for outcome in run.outcomes
    ]
    return ValidationReport(
        suite=suite_name,
        batch=batch_name,
        success=not any(not r.success and r.severity == ERROR for r in rules),
        row_count=len(batch),
        rules=rules,
        skipped=skipped,
        data_docs=run.data_docs,
        parameters=_json_value(parameters),
        suite_source=None if suite_spec is None else location,
    )


# --- pure helpers --------------------------------------------------------------------------------


def _split_on_columns(
    expectations: Sequence[dict], present: set[str], derived: Collection[str] = ()
) -> tuple[list[dict], list[dict]]:
    """Return (expectations to run, skipped entries) given the columns present in the batch.

    A rule skipped only for `derived` columns (the suite's `meta.derived_columns`, which the
    contract adds where they apply) is marked `derived`: the delivery lacks nothing."""
    kept: list[dict] = []
    skipped: list[dict] = []
    for entry in expectations:
        columns = expectation_columns(entry)
        missing = [column for column in columns if column not in present]
        if missing and entry["type"] not in _NEVER_SKIPPED:
            not_derived = [column for column in missing if column not in derived]
            reason = (
                f"column(s) {missing} not in the batch"
                if not_derived
                else f"derived column(s) {missing} not added: they do not apply to this batch"
            )
            skipped.append(
                {
                    "rule": rule_id(entry),
                    "expectation_type": entry["type"],
                    "columns": columns,
                    "missing_columns": missing,
                    "reason": reason,
                    "derived": not not_derived,
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
    outcome: RuleOutcome, batch: pd.DataFrame, key_columns: list[str], suite: str, location: str
) -> RuleResult:
    """Return the RuleResult of one rule's GX outcome in suite `suite`, defined at `location`
    (`suite_location`)."""
    entry, result = outcome.entry, outcome.result
    details: dict[str, Any] = {"kwargs": _json_value(outcome.kwargs)}
    if "observed_value" in result:
        details["observed_value"] = _json_value(result["observed_value"])
    if outcome.exception is not None:
        details["exception"] = outcome.exception
    rows = [int(i) for i in result.get("partial_unexpected_index_list") or []][:SAMPLE_LIMIT]
    values = list(result.get("partial_unexpected_list") or [])[:SAMPLE_LIMIT]
    keys = (
        _json_value(batch.iloc[rows][key_columns].to_dict("records"))
        if rows and key_columns
        else []
    )
    # The share of every row, not of the non-empty ones: 1 bad label of 38 rows is 2.63%,
    # not 100% because the other 37 are still open.
    percent = result.get("unexpected_percent_total", result.get("unexpected_percent"))
    return RuleResult(
        rule=rule_id(entry),
        expectation_type=entry["type"],
        columns=expectation_columns(entry),
        success=outcome.success,
        unexpected_count=int(result.get("unexpected_count") or 0),
        unexpected_percent=None if percent is None else float(percent),
        sample_rows=rows,
        sample_values=_json_value(values),
        details=details,
        sample_keys=keys,
        severity=rule_severity(entry, suite, location),
        advice=(entry.get("meta") or {}).get("advice"),
    )


def rejecting_rules(report: Mapping[str, Any]) -> list[str]:
    """Return the names of the rules of a stored report (`ValidationReport.to_dict()`) that
    reject its batch: those that failed, warnings left out."""
    return [
        str(rule.get("rule"))
        for rule in report.get("rules", [])
        if not rule.get("success", True) and rule.get("severity") != WARNING
    ]


def describe_rule_break(rule: RuleResult) -> str:
    """Return one sentence on a failed rule: what broke, how often, one row and value."""
    if "exception" in rule.details:
        return f"{rule.rule} could not be evaluated: {rule.details['exception']}."
    if rule.unexpected_count == 0 and rule.message:  # e.g. a file that could not be read
        return sentence(f"{rule.rule}: {rule.message}")
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
    return _json_moment(value)


def _json_moment(value: Any) -> Any:
    """A date or timestamp as `_json_value` writes it; anything else as its text."""
    if isinstance(value, dt.datetime):
        stamp = pd.Timestamp(value)
        if stamp.tzinfo is None and stamp == stamp.normalize():
            return stamp.strftime("%Y-%m-%d")
        return stamp.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)
