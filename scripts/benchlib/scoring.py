"""How a pruned copy of a shipped model is scored (higher is better unless ``higher`` is False).

Each ``*_scorer`` returns a :class:`Scorer`: a function of an ONNX Runtime session, plus the
number of held-out items (one item is the noise of the figure) and the direction. The
recognizer and MiniLM figures come from scripts/recognizer_cer.py and scripts/retrieval.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from rdprune_onnx.evaluate import accuracy
from rdprune_onnx.graph.load import load_model
from rdprune_onnx.runtime import Session, SessionConfig

from .records import ROOT

MODELS = ROOT / "models"
ScoreFn = Callable[[Session], dict[str, float]]


@dataclass(frozen=True)
class Scorer:
    """A task's scores on a session, how many held-out items they average, and the sense."""

    score: ScoreFn
    items: int
    higher: bool = True

    def __call__(self, session: Session) -> dict[str, float]:
        return self.score(session)

    def on_model(self, model: onnx.ModelProto, threads: int = 1) -> dict[str, float]:
        """The scores of ``model`` run in a fresh CPU session."""
        return self.score(cpu_session(model, threads))


def cpu_session(model: onnx.ModelProto, threads: int = 1) -> Session:
    """A CPU session with ``threads`` intra-op threads (one: on 2 shared cores it embedded the
    600 MiniLM texts in 14-16 s, against 19-22 s with 2 threads)."""
    return Session(model, SessionConfig(provider="cpu", intra_op_threads=threads))


def run_batched(session: Session, name: str, inputs: np.ndarray, batch: int) -> np.ndarray:
    """The model's first output over ``inputs`` fed as ``name``, ``batch`` samples at a time."""
    return np.concatenate(
        [session.run({name: inputs[s : s + batch]})[0] for s in range(0, len(inputs), batch)]
    )


def digits_scorer(test_path: Path = MODELS / "digits_test.npz") -> Scorer:
    """Top-1 accuracy of the digits CNN on the 450 held-out images (``accuracy``)."""
    with np.load(test_path) as f:
        inputs = np.asarray(f["input"])
        labels = np.asarray(f["label"])

    def score(session: Session) -> dict[str, float]:
        return {"accuracy": accuracy(run_batched(session, "input", inputs, 256), labels)}

    return Scorer(score, len(labels))


def recognizer_scorer(test_path: Path = MODELS / "recognizer_test.npz") -> Scorer:
    """Character error rate of the text-line recognizer on its held-out lines (``cer``)."""
    import recognizer_cer  # scripts/recognizer_cer.py

    with np.load(test_path) as f:
        inputs, truth = f["input"], recognizer_cer.labels_of(f["label"], f["label_length"])

    def score(session: Session) -> dict[str, float]:
        decoded = recognizer_cer.greedy_decode(run_batched(session, "image", inputs, 64))
        return {"cer": recognizer_cer.cer_of(decoded, truth)}

    return Scorer(score, len(inputs), higher=False)


def minilm_scorer(folder: Path, pairs: int | None = None, threads: int = 1) -> Scorer:
    """Retrieval recall@1 / recall@5 / MRR on the held-out (query, document) pairs, and the
    mean cosine of each held-out embedding to the dense model's (``recall_at_1``, ``mrr``,
    ``recall_at_5``, ``cosine``); ``pairs``: only the first N pairs."""
    import retrieval  # scripts/retrieval.py

    queries, docs = retrieval.load_pairs(folder)
    if pairs is not None:
        queries = {k: v[:pairs] for k, v in queries.items()}
        docs = {k: v[:pairs] for k, v in docs.items()}
    dense_session = cpu_session(load_model(folder / "minilm.onnx"), threads)
    dense = (retrieval.embed(dense_session, queries), retrieval.embed(dense_session, docs))
    del dense_session

    def score(session: Session) -> dict[str, float]:
        result: dict[str, float] = retrieval.evaluate(session, queries, docs, dense=dense)
        return result

    return Scorer(score, len(queries[retrieval.MASK]))
