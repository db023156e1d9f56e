"""The credit domain: probability of default, risk grades and reason codes on a user's loan book.

Modules: `config` (the loan-book TOML), `schema` (normalising deliveries, the GX suite built
from the config), `features`, `model` (tabular network, logistic baseline, calibration,
integrated-gradient reason codes), `metrics` (AUC, Gini, KS, Brier, log loss, PSI), `plots`,
`synthetic` (a book with a known PD function), `crossval`, `contract` (the ingest contract: the
suite and keys deliveries are checked against), `pipeline` (the steps and `CREDIT`).
"""
