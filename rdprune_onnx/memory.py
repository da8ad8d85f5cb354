"""Memory budgets shared by the stages that hold dense tensors (curves, refit)."""

# Dense tensors kept in memory at once: the crossing tensors of the curves (above this,
# layers are measured in groups) and the refit's dense targets (above this, recomputed).
DEFAULT_MEMORY_BUDGET = 2 * 1024**3
