"""The customers' raw contract: what ingest checks a delivery of transactions against,
for files shaped as a data source's config describes."""

from __future__ import annotations

import functools

from finpipe.customers.config import CustomersConfig, load_customers_config
from finpipe.customers.schema import (
    DOMAIN,
    KEY_COLUMNS,
    RESTATED_BY,
    SUITE,
    add_transaction_checks,
    normalise_transactions,
)
from finpipe.ingest import RawContract
from finpipe.settings import load_settings


def customers_contract(config: CustomersConfig) -> RawContract:
    """Return the raw contract for transaction files shaped as `config` describes."""
    return RawContract(
        domain=DOMAIN,
        suite=SUITE,
        key_columns=KEY_COLUMNS,
        date_column="date",
        normalise=functools.partial(normalise_transactions, config=config),
        add_check_columns=lambda frame, storage: add_transaction_checks(
            frame, allow_refunds=config.rules.allow_refunds
        ),
        read_options=config.read.pandas_options(),
        correction_keys=RESTATED_BY,
    )


def active_customers_config() -> CustomersConfig:
    """Return the transaction source the settings name (FINPIPE_CUSTOMERS_CONFIG)."""
    return load_customers_config(load_settings().customers_config)


def active_contract() -> RawContract:
    """Return the ingest contract of the transaction source the settings name."""
    return customers_contract(active_customers_config())
