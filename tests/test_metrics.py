import numpy as np

from fin.metrics import auc, gauc


def _pairwise_auc(labels, scores):
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (pos.size * neg.size)


def test_auc_matches_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(0, 2, 300)
        scores = rng.integers(0, 10, 300).astype(float)  # many ties
        assert abs(auc(labels, scores) - _pairwise_auc(labels, scores)) < 1e-12


def test_auc_edges():
    assert auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auc(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.3, 0.4])) == 0.0
    assert np.isnan(auc(np.array([1, 1]), np.array([0.1, 0.2])))


def test_a_nan_score_has_no_auc():
    """A model scoring NaN is not ranked (before, NaNs sorted last as distinct values: NaN on every click gave an
    AUC of 1.0, which passed the promotion gate, and the same two rows swapped gave 0 or 1)."""
    labels, scores, users = np.array([0, 1, 0, 1]), np.array([0.1, np.nan, 0.2, np.nan]), np.array([1, 1, 2, 2])
    assert np.isnan(auc(labels, scores)) and np.isnan(gauc(labels, scores, users))


def test_auc_matches_torchmetrics_on_random_data():
    import torch
    from torchmetrics.functional.classification import binary_auroc

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 5000)
    scores = rng.normal(size=5000) + labels * 0.5
    expected = binary_auroc(torch.tensor(scores), torch.tensor(labels)).item()
    assert abs(auc(labels, scores) - expected) < 1e-6


def test_gauc_weights_user_aucs_by_impressions_and_skips_one_class_users():
    import torch
    from torchmetrics.functional.classification import binary_auroc

    from fin.metrics import gauc

    rng = np.random.default_rng(2)
    groups = rng.integers(0, 40, 3000)
    labels = rng.integers(0, 2, 3000)
    scores = rng.normal(size=3000) + labels * (groups % 3)  # users differ in how separable they are
    groups = np.concatenate([groups, [99, 99, 99]])  # a user with clicks only: skipped
    labels = np.concatenate([labels, [1, 1, 1]])
    scores = np.concatenate([scores, [0.1, 0.2, 0.3]])
    total, weighted = 0, 0.0
    for g in np.unique(groups):
        m = groups == g
        if labels[m].min() == labels[m].max():
            continue
        weighted += binary_auroc(torch.tensor(scores[m]), torch.tensor(labels[m])).item() * m.sum()
        total += m.sum()
    assert abs(gauc(labels, scores, groups) - weighted / total) < 1e-6


def test_logloss_and_calibration():
    from fin.metrics import calibration, logloss

    labels = np.array([1, 0, 0, 1])
    probs = np.array([0.9, 0.2, 0.1, 0.6])
    assert abs(logloss(labels, probs) - np.mean(-np.log([0.9, 0.8, 0.9, 0.6]))) < 1e-12
    assert abs(calibration(labels, probs) - 1.8 / 2) < 1e-12
