"""onnxsim's post-training pruning passes, the peers our rows are compared with.

onnxsim (``pip install -e '.[bench]'``) is never a dependency of the library; when it is not
importable, :func:`benchlib.records.onnxsim_version` is None and the benchmarks skip these rows.
"""

from __future__ import annotations

import numpy as np
import onnx

# Pass name -> the row label the benchmarks print.
ONNXSIM_PASSES: dict[str, str] = {
    "magnitude": "onnxsim magnitude (per row)",
    "magnitude-global": "onnxsim magnitude (global)",
    "wanda": "onnxsim Wanda (per row)",
    "wanda-global": "onnxsim Wanda (global)",
    "sparsegpt": "onnxsim SparseGPT",
}


def run_onnxsim(
    pass_name: str, model: onnx.ModelProto, ratio: float, batches: list[dict[str, np.ndarray]]
) -> onnx.ModelProto:
    """A copy of ``model`` pruned to ``ratio`` by onnxsim's pass ``pass_name`` (Wanda and
    SparseGPT given the calibration ``batches``)."""
    from onnxsim import pruning

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if pass_name == "magnitude":
        return pruning.apply_magnitude_pruning(copy, sparsity=ratio)
    if pass_name == "magnitude-global":
        return pruning.apply_magnitude_pruning(copy, sparsity=ratio, global_sparsity=True)
    if pass_name == "wanda":
        return pruning.apply_wanda_pruning(copy, calibration_data=batches, sparsity=ratio)
    if pass_name == "wanda-global":
        return pruning.apply_wanda_pruning(
            copy, calibration_data=batches, sparsity=ratio, global_sparsity=True
        )
    if pass_name == "sparsegpt":
        return pruning.apply_sparsegpt_pruning(copy, calibration_data=batches, sparsity=ratio)
    raise ValueError(pass_name)
