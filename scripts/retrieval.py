"""Retrieval figures for the MiniLM benchmark: recall@1, recall@5 and MRR with ONNX Runtime,
and (given the dense model's embeddings) the cosine of each pruned embedding to the dense one.

The data are the files ``scripts/export_minilm.py`` writes to ``models/minilm/``:
``eval_queries.npz`` and ``eval_docs.npz`` (row i of one matches row i of the other), each an
``input_ids`` / ``attention_mask`` / ``token_type_ids`` set of int64 arrays of shape (n, 128).
Every query is ranked against every document by cosine similarity of the embeddings.

Embedding is exact but cheaper than running the padded arrays: texts are sorted by length and
each batch is cut to its longest text. The model mean-pools over the attention mask and its
attention ignores masked positions, so trailing padding does not change the embedding (checked:
the largest difference from the padded run is about 1e-8).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from rdprune_onnx.runtime import Session

MASK = "attention_mask"


def load_pairs(folder: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The tokenised queries and documents (row i of one matches row i of the other)."""
    folder = Path(folder)
    with np.load(folder / "eval_queries.npz") as q, np.load(folder / "eval_docs.npz") as d:
        queries = {k: np.asarray(q[k]) for k in q.files}
        docs = {k: np.asarray(d[k]) for k in d.files}
    n = len(queries[MASK])
    if len(docs[MASK]) != n:
        raise ValueError(f"{n} queries but {len(docs[MASK])} documents")
    return queries, docs


def embed(session: Session, tokens: Mapping[str, np.ndarray], batch_size: int = 32) -> np.ndarray:
    """Embeddings of every row of ``tokens``, in row order (the model's first output)."""
    lengths = np.asarray(tokens[MASK]).sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    out: np.ndarray | None = None
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(1, int(lengths[idx].max()))
        feeds = {k: np.ascontiguousarray(v[idx, :width]) for k, v in tokens.items()}
        value = session.run(feeds)[0]
        if out is None:
            out = np.zeros((len(order), *value.shape[1:]), dtype=np.float32)
        out[idx] = value
    assert out is not None
    return out


def retrieval_metrics(q_emb: np.ndarray, d_emb: np.ndarray) -> dict[str, float]:
    """Recall@1, recall@5 and MRR of each query against all documents (cosine similarity).

    Ties count against the query (``scripts/export_minilm.py`` counts them in its favour; the
    dense model has no ties, so its figures are the same): a pruned model that collapses every
    text onto one vector, or outputs NaN, must score 1/n, not 1. ``distinct_docs`` is the number
    of distinct document embeddings (rounded to 1e-6), to spot such a collapse.
    """
    rank = ranks(q_emb, d_emb)
    d = d_emb.astype(np.float64)
    d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    distinct = len(np.unique(np.round(d, 6), axis=0))
    return {
        "recall_at_1": float((rank == 1).mean()),
        "recall_at_5": float((rank <= 5).mean()),
        "mrr": float((1.0 / rank).mean()),
        "distinct_docs": float(distinct),
    }


def mean_cosine(emb: np.ndarray, reference: np.ndarray) -> float:
    """Mean cosine similarity of each row of ``emb`` to the same row of ``reference``.

    A row that is NaN or zero counts as cosine 0 (no similarity), not as NaN.
    """
    return float(cosines(emb, reference).mean())


def cosines(emb: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``emb`` to the same row of ``reference`` (0 for a NaN or zero
    row)."""
    a = emb.astype(np.float64)
    b = reference.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-300), 0.0)
    return np.asarray(np.nan_to_num(cos, nan=0.0))


def ranks(q_emb: np.ndarray, d_emb: np.ndarray) -> np.ndarray:
    """Per query, the rank of its own document among all documents by cosine similarity
    (1 = nearest; ties count against the query)."""
    q = q_emb.astype(np.float64)
    d = d_emb.astype(np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    sim = np.nan_to_num(q @ d.T, nan=-np.inf)
    others = ~np.eye(len(sim), dtype=bool)
    return np.asarray(1 + ((sim >= np.diag(sim)[:, None]) & others).sum(axis=1))


def evaluate(
    session: Session,
    queries: Mapping[str, np.ndarray],
    docs: Mapping[str, np.ndarray],
    batch_size: int = 32,
    dense: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, float]:
    """Recall@1, recall@5 and MRR of the model behind ``session`` on the pairs.

    With ``dense`` (the dense model's query and document embeddings, from :func:`embed`),
    also ``cosine``: the mean cosine of the model's embedding of each of the held-out texts
    (queries and documents) to the dense model's embedding of the same text.
    """
    q_emb = embed(session, queries, batch_size)
    d_emb = embed(session, docs, batch_size)
    out = retrieval_metrics(q_emb, d_emb)
    if dense is not None:
        out["cosine"] = mean_cosine(
            np.concatenate([q_emb, d_emb]), np.concatenate([dense[0], dense[1]])
        )
    return out
