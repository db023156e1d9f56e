"""Cross-validated AUC of the credit models: how the network compares with the logistic baseline
on a small book where one train/test split is too noisy to tell.

k-fold, stratified by outcome: each fold is the test set once; of the other rows a stratified
`validation_fraction` early-stops and calibrates, the rest trains. Every model sees the same
folds, so the comparison is paired.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split

from finpipe.credit.config import LoanBookConfig
from finpipe.credit.features import LABEL
from finpipe.credit.metrics import credit_metrics
from finpipe.credit.model import fit_loan_book_model


def cross_validated_auc(
    features: pd.DataFrame,
    *,
    book: LoanBookConfig,
    config,  # finpipe.credit.pipeline.CreditTrainingConfig
    folds: int = 5,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Return {model kind: test AUC of each fold} over the labelled rows of `features`."""
    labelled = features[features[LABEL].notna()].reset_index(drop=True)
    labels = labelled[LABEL].to_numpy()
    scores: dict[str, list[float]] = {kind: [] for kind in config.models}
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fold, (rest, test) in enumerate(splitter.split(labelled, labels)):
        train_rows, validation_rows = train_test_split(
            rest,
            test_size=config.validation_fraction,
            stratify=labels[rest],
            random_state=seed + fold,
        )
        train = np.zeros(len(labelled), dtype=bool)
        validation = np.zeros(len(labelled), dtype=bool)
        train[train_rows], validation[validation_rows] = True, True
        for kind in config.models:
            fitted = fit_loan_book_model(
                labelled,
                book,
                train=train,
                validation=validation,
                config=config.classifier_config(kind),
            )
            test_rows = labelled.iloc[test]
            scores[kind].append(credit_metrics(labels[test], fitted.predict_pd(test_rows))["auc"])
    return scores


def summarise(scores: dict[str, list[float]]) -> dict[str, str]:
    """Return {model kind: "mean ± std"} of fold AUCs (std over folds, ddof=0), 3 decimals."""
    return {kind: f"{np.mean(v):.3f} ± {np.std(v):.3f}" for kind, v in scores.items()}
