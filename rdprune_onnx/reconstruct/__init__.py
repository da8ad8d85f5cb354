"""One-shot weight reconstruction: refit the kept weights of each layer after masking.

After the masks are chosen, each prunable layer is visited in graph order and its kept
weights (and its bias, where the node has one) are refit by least squares so that the
layer, fed with the activations of the already masked-and-refit upstream model (X̂),
reproduces the dense layer's output on the dense activations (Y = dense layer(X)):

    minimise  || X̂ W' + b' - Y ||²   over the kept entries of W' (pruned entries stay 0).

Every layer is written as a matrix product in an *effective* layout ``X̂ (n, d) @ W (d, r)``
per group: ``d`` inputs, ``r`` output rows (output channels / columns), ``n`` calibration
rows. MatMul ``x @ W`` flattens the leading dimensions of x; ``W @ x`` is handled as
``xᵀ @ Wᵀ``; Gemm folds alpha into the weight and beta into the bias; Conv uses im2col
patches (:func:`im2col`), one problem per group. A weight shared by several nodes is refit
once against all its uses stacked.

Statistics stream over the calibration batches in float64: ``H = X̂ᵀX̂`` (d x d),
``G = X̂ᵀY`` (d x r) and ``ΣY²``; the layer's calibration error of any candidate weight
follows from them exactly (``tr(WᵀHW) - 2 tr(WᵀG) + ΣY²``), so the error before and after
the refit costs no extra pass. Activations come from ONNX Runtime: the layer's input and
output tensors are added as graph outputs of the type-inferred model and the graph is cut
to the nodes that compute them. The dense targets of all layers come from one dense pass
and are kept when they fit in ``DENSE_CACHE_BYTES`` (2 GiB), else they are recomputed per
layer. The inputs X̂ need one pass of the current (masked, upstream-refit) model per group
of layers; consecutive layers that read the same activation (Q/K/V projections, the
branches of a block) form one group and share the pass and the Hessian. A pass runs the
graph only up to the group's nodes, so the total is O(L²/2) layer evaluations for a chain
of L groups.

Inputs (``inputs=``): ``"sequential"`` (above: X̂ from the model pruned and refit so far,
the way SparseGPT calibrates LLMs) or ``"dense"``: H from the dense model's activations X,
summed in ONE pass over the data for all layers (as many as fit in ``DENSE_CACHE_BYTES`` per
pass), and ``G = H [W; b]``, ``ΣY² = tr([W; b]ᵀ G)`` from the dense weight, with no target
pass (:func:`dense_stats`, shared with the refit-aware curves).

Rows: calibration rows are real rows only. When the data has an attention-mask input
(:func:`token_mask_name`: a 2-D integer/bool input named ``*attention_mask*``, else
``*mask*``), the rows of ``x @ W`` layers whose activation's two leading axes are that
mask's (batch, seq) are dropped where the mask is 0 (padding), from H, G, ΣY² and the row
count (:func:`~rdprune_onnx.reconstruct.statistics.real_rows`; other shapes count every
row, logged). The warning about fewer rows than inputs uses that count.

Solvers (the damped Hessian is ``H + λI`` with ``λ = damping * mean(diag(H))`` over the
weight inputs, and ``damping`` times its own diagonal entry for a bias column, so that
scaling the activations scales the refit weights back exactly):

- ``exact``: for every output row, the least-squares solution restricted to the kept
  inputs of that row. A row with k kept and p pruned inputs solves either the k x k system
  on the kept set, or (when p < k) the equivalent p x p system on the pruned set through
  the inverse Hessian (``w = w* - H⁻¹[:, P] (H⁻¹[P, P])⁻¹ w*[P]``). Time
  ``O(Σ_rows min(k, p)³)`` (plus ``O(d³)`` for the inverse), memory ``O(d²)`` plus a
  bounded chunk (64 MiB) of gathered systems. The systems are solved in batches with one
  BLAS thread each (through threadpoolctl).
- ``sparsegpt``: the blockwise OBS update of SparseGPT (Frantar & Alistarh, 2023) with
  the FIXED mask given (no mask re-selection): starting from the unconstrained optimum
  ``W* = (H + λI)⁻¹ G``, columns are eliminated in order using the upper Cholesky factor of
  the inverse Hessian, 128 columns per block with lazy batch updates. Time
  ``O(d³ + r d²)``, memory ``O(d² + r d)``. It is an approximation of ``exact`` (each
  elimination assumes the later columns are free, and a processed column is frozen): its
  error reduction is typically 40-70% of the exact one.
- ``auto`` decides by estimated cost rather than by width alone: ``exact`` when its flop
  count (:func:`exact_cost`) is at most ``EXACT_MAX_FLOPS`` (1.5e11, about 10-15 s of one
  core) or at most ``EXACT_FLOP_FACTOR`` (4) times the SparseGPT estimate
  (:func:`sparsegpt_cost`); else ``sparsegpt``. Exact costs the most at 50% sparsity
  (min(k, p) = d/2): there it is picked up to d of about 1500-2000 for r of a few hundred
  to a few thousand rows (MiniLM's 384x1536 and 1536x384 both get exact) and SparseGPT
  above (ResNet-50's 3x3x256 and 3x3x512 convolutions); at 90% or 10% sparsity exact is
  cheap at any width. Here d counts the inputs of one group (Conv: channels per group x
  kernel size) plus one for a refit bias.

Mask selection (``select=True``): :func:`solve_sparsegpt_select` is SparseGPT proper
(Frantar & Alistarh 2023, Algorithm 1): the same blockwise sweep, but at the start of each
128-column block the entries to prune are chosen by the OBS saliency ``w² / U_jj²`` (U the
upper Cholesky factor of the damped inverse Hessian) over the whole block, before the
block's columns are eliminated; the total count of zeros is kept exactly (block quotas by
largest remainder, dense zeros first). The layer keeps the number of zeros of the given
mask; the selected-and-updated weight replaces the given mask's refit only when its
calibration error is lower (LayerRefit method ``"sparsegpt-select"``).

Guarantee: after solving, the refit weight (cast back to the weight's dtype) is scored on
the calibration statistics; if it does not lower the layer's error below plain masking,
the plain masked weight (and the original bias) are kept. Pruned positions are exactly
zero and every kept position stays nonzero, so each layer's count of zeros is unchanged.

Not supported (reported as ``skipped`` with the reason): ConvTranspose, weights used inside
If/Loop/Scan subgraphs, MatMul weights of rank above 2, nodes whose activation operand is a
constant, Gemm with a computed (non-constant) C, Conv with a computed bias, and weights
shared by nodes that use them in different layouts. A bias is refit only when it is a
float constant used by this node alone and the weight has a single use: Conv input 2, Gemm
C of shape (N,) or (1, N) (beta != 0), or a constant (N,)-shaped operand of the Add that is
the sole consumer of a ``x @ W`` MatMul's output.

The package, from the bottom up (each module imports only those above it):

- :mod:`~rdprune_onnx.reconstruct.solvers`: the solvers and the damping, pure numpy.
- :mod:`~rdprune_onnx.reconstruct.layout`: how a weight maps to the effective layout
  (plans, im2col, the conversions).
- :mod:`~rdprune_onnx.reconstruct.statistics`: H, G and ΣY² from the activations.
- :mod:`~rdprune_onnx.reconstruct.refit`: one layer's refit and SparseGPT selection.
- :mod:`~rdprune_onnx.reconstruct.sequential`: :func:`reconstruct`, the layer-by-layer refit.
- :mod:`~rdprune_onnx.reconstruct.refit_curves`: refit-aware curves (``--refit-curves``).
"""

from rdprune_onnx.reconstruct.layout import conv_pads, im2col
from rdprune_onnx.reconstruct.refit import LayerRefit, LayerSolve, select_refit
from rdprune_onnx.reconstruct.refit_curves import (
    MEMO_BYTES,
    REFIT_DAMPING,
    CurveRefitCost,
    RefitCandidates,
    SequentialRefitCandidates,
    remeasure_curves,
)
from rdprune_onnx.reconstruct.sequential import (
    DENSE_CACHE_BYTES,
    INPUTS,
    Reconstruction,
    reconstruct,
)
from rdprune_onnx.reconstruct.solvers import (
    BLOCK_SIZE,
    DAMPING,
    EXACT_FLOP_FACTOR,
    EXACT_MAX_FLOPS,
    SELECT_METHOD,
    SOLVERS,
    Factors,
    block_quotas,
    check_solver,
    choose_solver,
    damped_hessian,
    exact_cost,
    solve_exact,
    solve_sparsegpt,
    solve_sparsegpt_select,
    sparsegpt_cost,
)
from rdprune_onnx.reconstruct.statistics import dense_stats, dense_sums, token_mask_name

__all__ = [
    "BLOCK_SIZE",
    "DAMPING",
    "DENSE_CACHE_BYTES",
    "EXACT_FLOP_FACTOR",
    "EXACT_MAX_FLOPS",
    "INPUTS",
    "MEMO_BYTES",
    "REFIT_DAMPING",
    "SELECT_METHOD",
    "SOLVERS",
    "CurveRefitCost",
    "Factors",
    "LayerRefit",
    "LayerSolve",
    "Reconstruction",
    "RefitCandidates",
    "SequentialRefitCandidates",
    "block_quotas",
    "check_solver",
    "choose_solver",
    "conv_pads",
    "damped_hessian",
    "dense_stats",
    "dense_sums",
    "exact_cost",
    "im2col",
    "reconstruct",
    "remeasure_curves",
    "select_refit",
    "solve_exact",
    "solve_sparsegpt",
    "solve_sparsegpt_select",
    "sparsegpt_cost",
    "token_mask_name",
]
