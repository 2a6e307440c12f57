"""Metrics, thresholds and bootstrap intervals against scikit-learn and hand computations."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from medflow.errors import StepError
from medflow.evaluation import metrics as M


def _sample(n: int = 300, seed: int = 0, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.35).astype(int)
    p = np.clip(0.35 * y + rng.normal(0.35, 0.2, n), 0, 1)
    if ties:
        p = np.round(p, 1)
    return y, p


def _sklearn(y: np.ndarray, p: np.ndarray, t: float, w: np.ndarray | None = None) -> dict[str, float]:
    pred = (p >= t).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, sample_weight=w).ravel()
    return {
        "roc_auc": skm.roc_auc_score(y, p, sample_weight=w),
        "pr_auc": skm.average_precision_score(y, p, sample_weight=w),
        "accuracy": skm.accuracy_score(y, pred, sample_weight=w),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred, sample_weight=w),
        "sensitivity": skm.recall_score(y, pred, sample_weight=w),
        "specificity": tn / (tn + fp),
        "precision": skm.precision_score(y, pred, sample_weight=w),
        "npv": tn / (tn + fn),
        "f1": skm.f1_score(y, pred, sample_weight=w),
        "brier": skm.brier_score_loss(y, p, sample_weight=w),
    }


@pytest.mark.parametrize("ties", [False, True])
def test_point_metrics_match_sklearn(ties: bool) -> None:
    y, p = _sample(ties=ties)
    ours = M.point_metrics(y, p, 0.5)
    for name, expected in _sklearn(y, p, 0.5).items():
        assert ours[name] == pytest.approx(expected, abs=1e-12), name


def test_weighted_metrics_match_sklearn_sample_weight() -> None:
    y, p = _sample(ties=True)
    w = M.bootstrap_weights(y, 3, seed=1)
    batch = M.batch_metrics(y, p, w, 0.4)
    for row in range(3):
        for name, expected in _sklearn(y, p, 0.4, w[row]).items():
            assert batch[name][row] == pytest.approx(expected, abs=1e-12), (name, row)


def test_ece_by_hand() -> None:
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.05, 0.15, 0.95, 0.85, 1.0])
    # bins of width 0.5: [0.05, 0.15] mean p 0.1, mean y 0.5; [0.95, 0.85, 1.0] mean p 0.9333, mean y 2/3
    expected = 2 / 5 * abs(0.1 - 0.5) + 3 / 5 * abs(2.8 / 3 - 2 / 3)
    assert M.point_metrics(y, p, 0.5, bins=2)["ece"] == pytest.approx(expected)
    table = M.calibration_table(y, p, bins=2)
    assert table["count"].tolist() == [2, 3]
    assert table["fraction_positive"].tolist() == pytest.approx([0.5, 2 / 3])


def test_perfect_and_random_classifiers() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(4000) < 0.3).astype(int)
    perfect = M.point_metrics(y, np.where(y == 1, 0.9, 0.1), 0.5)
    assert perfect["roc_auc"] == 1.0 and perfect["pr_auc"] == 1.0 and perfect["accuracy"] == 1.0
    random = M.point_metrics(y, rng.random(4000), 0.5)
    assert random["roc_auc"] == pytest.approx(0.5, abs=0.03)
    assert random["pr_auc"] == pytest.approx(y.mean(), abs=0.03)


def test_target_sensitivity_threshold_on_toy_example() -> None:
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.35, 0.4, 0.6, 0.7, 0.9])
    # sensitivity >= 0.75 needs 3 of 4 positives: the highest such cut is 0.6 (0.4 is a negative)
    assert M.select_threshold(y, p, "target_sensitivity", target_sensitivity=0.75) == 0.6
    assert M.select_threshold(y, p, "target_sensitivity", target_sensitivity=1.0) == 0.35
    assert M.select_threshold(y, p, "target_sensitivity", target_sensitivity=0.2) == 0.9
    # Youden: at 0.6, sens 0.75 spec 1 -> J 0.75; at 0.35, sens 1 spec 0.75 -> J 0.75; highest wins
    assert M.select_threshold(y, p, "youden") == 0.6
    assert M.select_threshold(y, p, "fixed", fixed=0.42) == 0.42


def test_youden_matches_sklearn_roc_curve() -> None:
    y, p = _sample(seed=5)
    fpr, tpr, thr = skm.roc_curve(y, p)
    assert M.select_threshold(y, p, "youden") == pytest.approx(thr[np.argmax(tpr - fpr)])


def test_threshold_needs_both_classes() -> None:
    with pytest.raises(StepError, match="both classes"):
        M.select_threshold(np.ones(5), np.linspace(0, 1, 5), "youden")


def test_bootstrap_interval_contains_point_and_shrinks_with_n() -> None:
    widths = []
    y_all, p_all = _sample(n=1600, seed=4)
    for n in (100, 400, 1600):
        y, p = y_all[:n], p_all[:n]
        ci = M.bootstrap(y, p, 0.5, n=1000, seed=0)
        for name, iv in ci.items():
            assert iv.low <= iv.value <= iv.high, name
        widths.append(ci["roc_auc"].high - ci["roc_auc"].low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(4, rel=0.35)  # ~ 1 / sqrt(n)


def test_bootstrap_interval_follows_the_confidence() -> None:
    y, p = _sample()
    wide = M.bootstrap(y, p, 0.5, n=1000, seed=3, confidence=0.95)
    narrow = M.bootstrap(y, p, 0.5, n=1000, seed=3, confidence=0.8)  # same resamples, inner percentiles
    for name in M.METRICS:
        assert wide[name].low <= narrow[name].low <= narrow[name].high <= wide[name].high, name
    assert narrow["roc_auc"].high - narrow["roc_auc"].low < 0.8 * (wide["roc_auc"].high - wide["roc_auc"].low)


def test_bootstrap_is_seeded_and_stratified() -> None:
    y, p = _sample()
    a = M.bootstrap(y, p, 0.5, n=1000, seed=7)
    b = M.bootstrap(y, p, 0.5, n=1000, seed=7)
    assert a == b
    w = M.bootstrap_weights(y, 50, seed=1)
    assert (w[:, y == 1].sum(axis=1) == (y == 1).sum()).all()
    assert (w[:, y == 0].sum(axis=1) == (y == 0).sum()).all()


def test_patient_bootstrap_draws_whole_patients() -> None:
    y = np.array([1, 1, 0, 0, 0, 1])
    groups = np.array(["a", "a", "b", "b", "c", "d"])
    w = M.bootstrap_weights(y, 200, seed=2, groups=groups)
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 2] == w[:, 3]).all()
    # strata: patients with a positive (a, d) and without (b, c): two of each per resample
    assert ((w[:, 0] + w[:, 5]) == 2).all() and ((w[:, 2] + w[:, 4]) == 2).all()
    ci = M.bootstrap(y, np.array([0.9, 0.8, 0.2, 0.3, 0.1, 0.7]), 0.5, n=1000, groups=groups)
    assert ci["roc_auc"].value == 1.0


def test_paired_bootstrap_detects_a_worse_model() -> None:
    y, p = _sample(n=400, seed=11)
    noise = np.random.default_rng(1).random(400)
    worse = M.paired_bootstrap(y, noise, p, n=1000)
    assert worse["high"] < 0 and worse["p_worse"] > 0.99
    same = M.paired_bootstrap(y, p, p, n=1000)
    assert same["point"] == same["low"] == same["high"] == 0.0


def test_curves_match_sklearn() -> None:
    y, p = _sample(ties=True)
    roc = M.roc_points(y, p)
    fpr, tpr, _ = skm.roc_curve(y, p, drop_intermediate=False)
    assert np.allclose(roc["fpr"], fpr) and np.allclose(roc["tpr"], tpr)
    assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(skm.roc_auc_score(y, p))
    pr = M.pr_points(y, p)
    precision, recall, _ = skm.precision_recall_curve(y, p, drop_intermediate=False)
    assert np.allclose(pr["precision"], precision[:-1][::-1]) and np.allclose(pr["recall"], recall[:-1][::-1])
    assert M.confusion(y, p, 0.5) == dict(zip(("tn", "fp", "fn", "tp"),
                                               map(int, skm.confusion_matrix(y, p >= 0.5).ravel()), strict=True))


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(StepError, match="0 or 1"):
        M.point_metrics(np.array([0, 2]), np.array([0.1, 0.2]), 0.5)
    with pytest.raises(StepError, match=r"\[0, 1\]"):
        M.point_metrics(np.array([0, 1]), np.array([0.1, 1.2]), 0.5)
    with pytest.raises(StepError, match="same length"):
        M.point_metrics(np.array([0, 1]), np.array([0.1]), 0.5)
