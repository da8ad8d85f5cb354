"""SparseGPT masks (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be
Accurately Pruned in One-Shot", ICML 2023): the weights to prune are chosen by the OBS
saliency w² / [H⁻¹]_jj² from the layer's Hessian of its inputs, and the kept weights are
updated in the same sweep (:func:`rdprune_onnx.reconstruct.solve_sparsegpt_select`).

The choice needs the Hessian and rewrites the kept weights, so it is not an order of the
weight alone: this criterion gives the magnitude order, which is the starting mask that the
refit (``reconstruct(select=True)``) re-chooses at the same count, layer by layer, and what
global and LAMP rank. ``rewrites_weights`` tells the pipeline that the refit is implied.
"""

from __future__ import annotations

from rdprune_onnx.masks.magnitude import MagnitudeMask


class SparseGPTMask(MagnitudeMask):
    """OBS selection and update at the refit; |w| before it."""

    name: str = "sparsegpt"
    rewrites_weights: bool = True
