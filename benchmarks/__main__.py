"""`python -m benchmarks`: time finpipe's stages against their references (developer tooling).

Run from the repository root (`make bench` = `python -m benchmarks --domain all`); the package
is a folder of the repository, not part of the installed finpipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from finpipe.errors import ConfigError, FinpipeError

RESULTS = Path(__file__).resolve().parent / "results"
app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)


@app.command()
def bench(
    domain: Annotated[
        str,
        typer.Option(
            help="Domain(s) to measure: market, credit, customers, a comma-separated list, or "
            "all (market, then credit, then customers)."
        ),
    ] = "market",
    sizes: Annotated[str, typer.Option(help="Comma-separated sizes: S, 4S, 16S.")] = "S,4S,16S",
    repetitions: Annotated[
        str, typer.Option(help="Repetitions: one count, or one per size (e.g. 3,3,2).")
    ] = "3",
    stages: Annotated[
        str,
        typer.Option(help="Comma-separated stages (validation, features, training, ...)."),
    ] = "validation,features,training,orchestration,scoring",
    base_tickers: Annotated[int, typer.Option(min=10, help="Tickers at size S.")] = 500,
    base_days: Annotated[int, typer.Option(min=300, help="Trading days at size S.")] = 2520,
    base_applications: Annotated[
        int, typer.Option(min=2000, help="Credit: loan applications at size S.")
    ] = 50_000,
    base_customers: Annotated[
        int, typer.Option(min=200, help="Customers: customers at size S.")
    ] = 2_500,
    train_epochs: Annotated[int, typer.Option(min=1, help="Epochs per training timing.")] = 1,
    nightly_epochs: Annotated[int, typer.Option(min=1, help="max_epochs of the nightly runs.")] = 2,
    torch_threads: Annotated[int, typer.Option(min=1, help="torch.set_num_threads.")] = 1,
    workdir: Annotated[Path | None, typer.Option(help="Scratch folder (default: temp).")] = None,
    out: Annotated[
        Path, typer.Option(help="Where latest.json/latest.md go (default: benchmarks/results).")
    ] = RESULTS,
) -> None:
    """Time every stage against its reference at sizes S/4S/16S; write a table and results."""
    from benchmarks.suite import (
        DOMAINS,
        BenchConfig,
        record_domain,
        results_table,
        run_benchmarks,
    )

    chosen = [d.strip() for d in domain.split(",") if d.strip()]
    config = BenchConfig(
        domains=list(DOMAINS) if chosen == ["all"] else chosen,
        sizes=[s.strip() for s in sizes.split(",") if s.strip()],
        repetitions=_counts(repetitions),
        stages=[s.strip() for s in stages.split(",") if s.strip()],
        base_tickers=base_tickers,
        base_days=base_days,
        base_applications=base_applications,
        base_customers=base_customers,
        train_epochs=train_epochs,
        nightly_epochs=nightly_epochs,
        torch_threads=torch_threads,
        out=out,
        **({"workdir": workdir} if workdir else {}),
    )
    records = run_benchmarks(config, say=lambda message: typer.echo(message, err=True))
    for name in config.domains:
        typer.echo(f"\n{name}\n" + results_table([r for r in records if record_domain(r) == name]))
    typer.echo(f"results: {out / 'latest.json'}, {out / 'latest.md'}")


def _counts(text: str) -> list[int]:
    """Read `--repetitions` (one count, or one per size)."""
    try:
        return [int(count) for count in text.split(",") if count.strip()]
    except ValueError:
        raise ConfigError(
            f"--repetitions {text!r}: give whole numbers, one count or one per size (3,3,2)"
        ) from None


def main() -> None:
    """Entry point: finpipe errors (a bad size, no champion to score) become one clear line and
    exit status 2, as in the `finpipe` command."""
    try:
        app(prog_name="python -m benchmarks")
    except FinpipeError as error:
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
