import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from kamal_engine.metrics import average_precision, mean_ap, top1_accuracy


@pytest.mark.parametrize("seed", range(40))
def test_ap_equals_sklearn_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 200))
    targets = rng.integers(0, 2, n)
    targets[0] = 1
    # half the cases with many tied scores
    scores = rng.integers(0, 5, n).astype(float) if seed % 2 else rng.normal(size=n)
    assert average_precision(scores, targets) == pytest.approx(average_precision_score(targets, scores), abs=1e-12)


def test_ap_hand_case():
    # ranking: + - + -  → precision at the two hits: 1, 2/3 → AP = (1 + 2/3) / 2
    assert average_precision([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx(5 / 6)


def test_ap_without_positives_is_nan_and_left_out_of_map():
    assert math.isnan(average_precision([0.2, 0.1], [0, 0]))
    assert mean_ap({"a": 0.5, "b": math.nan, "c": 1.0}) == pytest.approx(0.75)


def test_top1_accuracy():
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert top1_accuracy(scores, np.array([1, 0, 0])) == pytest.approx(2 / 3)
