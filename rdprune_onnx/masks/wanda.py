"""Wanda masks (Sun et al., "A Simple and Effective Pruning Approach for Large Language
Models", ICLR 2024): the importance of weight W[i, j] is |W[i, j]| times the L2 norm of
input feature j over the calibration data, and weights are compared within each output row.

For the exact global count a layer is given, the rows are pruned evenly by the
interleaved order of :func:`rdprune_onnx.masks.base.interleaved_order` (every row
floor/ceil of k/rows), each row by its own scores. The statistics (per-feature norms and the
row of every entry, for Gemm, MatMul on either side, Conv of any grouping and
ConvTranspose) come from :mod:`rdprune_onnx.activations`.
"""

from __future__ import annotations

import numpy as np

from rdprune_onnx.masks.base import LayerStats, interleaved_order


class WandaMask:
    """|W| x ||x_feature||, compared per output row."""

    name: str = "wanda"
    needs_statistics: bool = True
    rewrites_weights: bool = False

    def scores(self, weight: np.ndarray, stats: LayerStats | None) -> np.ndarray:
        if stats is None:
            raise ValueError("the wanda mask needs the layer's input statistics")
        magnitude = np.abs(weight.astype(np.float64, copy=False))
        result: np.ndarray = magnitude * stats.full_norms(weight.shape)
        return result

    def order(self, weight: np.ndarray, stats: LayerStats | None) -> np.ndarray:
        if stats is None:
            raise ValueError("the wanda mask needs the layer's input statistics")
        scores = self.scores(weight, stats).reshape(-1)
        rows = np.ascontiguousarray(stats.full_rows(weight.shape)).reshape(-1)
        return interleaved_order(scores, rows, (weight == 0).reshape(-1))
