"""Task metrics for targets and sweeps: accuracy, agreement, cosine and a user callable."""

from __future__ import annotations

import numpy as np
import pytest

from rdprune_onnx.errors import UserError
from rdprune_onnx.quality import Outputs, choose_metric, cosine, score

LOGITS = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 4.0], [5.0, 1.0, 0.0]])
LABELS = np.array([0, 1, 1, 0])


def test_defaults_follow_the_data() -> None:
    assert choose_metric(None, LABELS, {"y": LOGITS}) == "accuracy"
    assert choose_metric(None, None, {"y": LOGITS}) == "agreement"
    unit = LOGITS / np.linalg.norm(LOGITS, axis=1, keepdims=True)
    assert choose_metric(None, None, {"emb": unit}) == "cosine"


def test_metric_mistakes_are_user_errors() -> None:
    with pytest.raises(UserError, match="needs labels"):
        choose_metric("accuracy", None, {"y": LOGITS})
    unit = LOGITS / np.linalg.norm(LOGITS, axis=1, keepdims=True)
    with pytest.raises(UserError, match="class-score output"):
        choose_metric("agreement", None, {"emb": unit})
    with pytest.raises(UserError, match="unknown quality metric"):
        choose_metric("f1", None, {"y": LOGITS})


def test_accuracy_agreement_and_cosine_values() -> None:
    pruned = LOGITS.copy()
    pruned[0] = [0.0, 2.0, 1.0]  # sample 0 now predicts class 1 (label 0): one error more
    quality, _ = score("accuracy", {"y": LOGITS}, {"y": pruned}, LABELS)
    assert (quality.dense, quality.pruned) == (0.75, 0.5)
    assert quality.drop == pytest.approx(0.25)
    quality, _ = score("agreement", {"y": LOGITS}, {"y": pruned})
    assert (quality.dense, quality.pruned) == (1.0, 0.75)
    quality, _ = score("cosine", {"y": LOGITS}, {"y": pruned})
    expected = np.mean(
        [
            float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
            for a, b in zip(LOGITS, pruned, strict=True)
        ]
    )
    assert quality.pruned == pytest.approx(expected)


def test_cosine_of_a_collapsed_output_is_zero_not_one() -> None:
    assert cosine(LOGITS, np.zeros_like(LOGITS)) == 0.0
    assert cosine(np.zeros_like(LOGITS), np.zeros_like(LOGITS)) == 1.0
    assert cosine(LOGITS, 3.0 * LOGITS) == pytest.approx(1.0)


def test_user_metric_scores_dense_against_itself() -> None:
    def recall_like(dense: Outputs, pruned: Outputs) -> float:
        return float(np.mean(pruned["y"].argmax(axis=1) == LABELS))

    quality, evaluation = score(recall_like, {"y": LOGITS}, {"y": -LOGITS})
    assert quality.metric == "recall_like"
    assert quality.dense == 0.75 and quality.pruned == 0.25
    assert evaluation.samples == 4
    with pytest.raises(UserError, match="finite"):
        score(lambda d, p: float("nan"), {"y": LOGITS}, {"y": LOGITS})
