"""Drift statistics, the review threshold and calibration, on arrays with known results."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tagcli.evaluate import reliability_table
from tagcli.model import fit_temperature, softmax
from tagcli.monitor import (
    build_drift_reference,
    choose_review_threshold,
    nearest_centroid_distance,
    population_stability_index,
)

TAGS = ["a", "b", "c"]


def test_threshold_catches_error_share():
    confidences = [0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.90, 0.95, 0.99, 0.999]
    correct = [False, True, False, True, False, True, False, True, True, True]

    choice = choose_review_threshold(confidences, correct, error_share=0.75)

    # Errors at 0.3, 0.5, 0.7 and 0.9; three of four lie below 0.7's midpoint to 0.8.
    assert choice["threshold"] == pytest.approx(0.75)
    assert choice["errors"] == 4
    assert choice["errors_caught"] == 3
    assert choice["rows_queued"] == 5
    assert choice["share_queued"] == pytest.approx(0.5)


def test_threshold_all_errors_caught():
    confidences = [0.2, 0.9, 0.4, 0.8]
    correct = [False, True, False, True]

    choice = choose_review_threshold(confidences, correct, error_share=1.0)

    assert choice["threshold"] == pytest.approx(0.6)
    assert choice["errors_caught"] == 2
    assert choice["rows_queued"] == 2


def test_threshold_without_errors_is_zero():
    choice = choose_review_threshold([0.6, 0.9], [True, True], error_share=0.8)

    assert choice["threshold"] == 0.0
    assert choice["rows_queued"] == 0


def test_psi_matches_formula():
    expected = {"a": 0.5, "b": 0.3, "c": 0.2}
    actual = {"a": 0.4, "b": 0.4, "c": 0.2}

    psi = population_stability_index(expected, actual)

    by_hand = (0.4 - 0.5) * math.log(0.4 / 0.5) + (0.4 - 0.3) * math.log(0.4 / 0.3)
    assert psi == pytest.approx(by_hand)
    assert population_stability_index(expected, expected) == 0.0


def test_psi_with_empty_tag_is_finite():
    psi = population_stability_index({"a": 0.5, "b": 0.5}, {"a": 1.0, "b": 0.0})

    assert math.isfinite(psi)
    assert psi > 1.0


def test_reliability_table_and_ece():
    confidences = [0.95, 0.95, 0.95, 0.95, 0.55, 0.55]
    correct = [True, True, True, False, True, False]

    table = reliability_table(confidences, correct, bins=10)

    top = table["bins"][9]
    middle = table["bins"][5]
    assert top["rows"] == 4
    assert top["accuracy"] == pytest.approx(0.75)
    assert top["gap"] == pytest.approx(0.20)
    assert middle["rows"] == 2
    assert middle["accuracy"] == pytest.approx(0.5)
    assert table["bins"][0]["rows"] == 0
    assert table["bins"][0]["accuracy"] is None
    assert table["ece"] == pytest.approx(4 / 6 * 0.20 + 2 / 6 * 0.05)


def test_temperature_softens_overconfident_logits():
    generator = np.random.default_rng(0)
    labels = generator.integers(0, 3, size=600)
    # Logits that point at the true tag 70% of the time, scaled to be far too sure.
    hinted = np.where(generator.random(600) < 0.7, labels, generator.integers(0, 3, 600))
    logits = np.zeros((600, 3))
    logits[np.arange(600), hinted] = 8.0
    tag_labels = [TAGS[i] for i in labels]

    temperature = fit_temperature(logits, tag_labels, TAGS)

    def log_loss(scale: float) -> float:
        probabilities = softmax(logits / scale)
        return float(-np.log(probabilities[np.arange(600), labels]).mean())

    assert temperature > 2.0
    assert log_loss(temperature) < log_loss(1.0)


def test_softmax_gives_missing_tag_zero():
    probabilities = softmax(np.array([[1.0, -np.inf, 0.0]]))

    assert probabilities[0, 1] == 0.0
    assert probabilities.sum() == pytest.approx(1.0)


def _unit(vectors):
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_reference_distances_leave_row_out():
    embeddings = _unit([[1, 0.1, 0], [1, -0.1, 0], [1, 0, 0.1], [0, 1, 0], [0, 1, 0.1]])
    labels = ["a", "a", "a", "b", "b"]

    reference = build_drift_reference(embeddings, labels, labels, TAGS)

    assert reference.centroid_tags == ["a", "b"]
    assert reference.tag_shares == {"a": 0.6, "b": 0.4, "c": 0.0}
    # Each row is compared with the centroid of the other rows of its tag, so
    # no training distance is 0 even though the rows sit on their centroids.
    assert reference.distance_percentiles[0] > 0
    assert reference.distance_at(1.0) < 0.05


def test_far_row_has_large_distance():
    embeddings = _unit([[1, 0.1, 0], [1, -0.1, 0], [0, 1, 0.1], [0, 1, -0.1]])
    reference = build_drift_reference(embeddings, ["a", "a", "b", "b"], ["a"] * 4, TAGS)

    distances = nearest_centroid_distance(reference, _unit([[1, 0, 0], [0, 0, 1]]))

    assert distances[0] < 0.01
    assert distances[1] == pytest.approx(1.0, abs=0.01)
    assert distances[1] > reference.distance_at(0.99)
