"""Behavioural checks of the model trained on all sample rows, on sentences written here.

Minimum functionality: plain examples of each tag. Invariance: changing a name
or number that carries no topic keeps the tag. Directional: adding words of a
topic raises that topic's probability.
"""

from __future__ import annotations

import pytest

from tagcli.backends import load_artifact_backend
from tagcli.model import load_artifact

pytestmark = pytest.mark.slow

TAGS = ["natural-language-processing", "computer-vision", "mlops", "other"]


@pytest.fixture(scope="module")
def predict(full_model):
    artifact = load_artifact(full_model, TAGS)
    backend = load_artifact_backend(artifact, offline=True)

    def probabilities(texts: list[str]):
        return artifact.head.predict_proba(backend.embed(texts), texts)

    def tags(texts: list[str]) -> list[str]:
        return [TAGS[i] for i in probabilities(texts).argmax(axis=1)]

    return tags, probabilities


MINIMUM_FUNCTIONALITY = [
    (
        "Named entity recognition for clinical notes. Extract drug names from free text with a fine-tuned language model.",
        "natural-language-processing",
    ),
    (
        "Machine translation from English to German with a sequence-to-sequence transformer.",
        "natural-language-processing",
    ),
    (
        "Real-time object detection. Detect pedestrians and cars in dashcam images with a convolutional network.",
        "computer-vision",
    ),
    (
        "Semantic segmentation of satellite imagery to map buildings and roads pixel by pixel.",
        "computer-vision",
    ),
    (
        "Serving models in production. Deploy, monitor and version machine learning models with a CI/CD pipeline.",
        "mlops",
    ),
    (
        "Feature store for ML pipelines. Track experiments, orchestrate training jobs and serve features at scale.",
        "mlops",
    ),
    (
        "Graph neural networks for molecules. Message passing on graphs to predict chemical properties.",
        "other",
    ),
    (
        "Reinforcement learning agent that learns to play Atari games from rewards with deep Q-learning.",
        "other",
    ),
]


@pytest.mark.parametrize("text,expected", MINIMUM_FUNCTIONALITY)
def test_minimum_functionality(predict, text, expected):
    tags, _ = predict
    assert tags([text]) == [expected]


INVARIANT_PAIRS = [
    (
        "Sentiment analysis of tweets about Apple with a fine-tuned BERT model.",
        "Sentiment analysis of tweets about Toyota with a fine-tuned BERT model.",
    ),
    (
        "Face detection in photos taken in Paris with a lightweight CNN.",
        "Face detection in photos taken in Nairobi with a lightweight CNN.",
    ),
    (
        "Monitoring 12 models in production for data drift with alerts.",
        "Monitoring 300 models in production for data drift with alerts.",
    ),
]


@pytest.mark.parametrize("first,second", INVARIANT_PAIRS)
def test_invariance_to_names_and_numbers(predict, first, second):
    tags, _ = predict
    first_tag, second_tag = tags([first, second])
    assert first_tag == second_tag


DIRECTIONAL = [
    (
        "A deep learning library with tutorials.",
        " It segments medical images and detects tumours in CT scans.",
        "computer-vision",
    ),
    (
        "A deep learning library with tutorials.",
        " It answers questions and summarises long documents written in English.",
        "natural-language-processing",
    ),
    (
        "A deep learning library with tutorials.",
        " It packages models in Docker and deploys them on Kubernetes with monitoring.",
        "mlops",
    ),
]


@pytest.mark.parametrize("base,addition,tag", DIRECTIONAL)
def test_topic_words_raise_probability(predict, base, addition, tag):
    _, probabilities = predict
    before, after = probabilities([base, base + addition])
    column = TAGS.index(tag)
    assert after[column] > before[column]
    assert after[column] > 0.5
