"""Layer weights read on demand, for models too large to hold twice.

A model loaded from a file with external data keeps its large tensors on disk (see
:mod:`rdprune_onnx.graph.external`). Holding every layer's dense weight, then every
layer's pruned weight, as numpy arrays would cost one or two extra copies of the model;
these mappings compute each weight when it is asked for and keep nothing, so code that
walks the layers one at a time (writing a file, counting zeros) holds one layer at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx

from rdprune_onnx.graph.layers import read_weight
from rdprune_onnx.masks import apply_mask


class ModelWeights(Mapping[str, np.ndarray]):
    """``name -> weight`` for the named constants of ``model``, read at each access.

    With ``counts``, each weight comes back with its ``counts[name]`` smallest-magnitude
    entries set to zero (:func:`rdprune_onnx.masks.apply_mask`), as the pipeline masks them.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        names: Sequence[str],
        counts: Mapping[str, int] | None = None,
    ) -> None:
        self.model = model
        self.names = list(names)
        self._known = set(self.names)
        self.counts = dict(counts) if counts is not None else None

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._known:
            raise KeyError(name)
        weight = read_weight(self.model, name)
        if self.counts is None:
            return weight
        return apply_mask(weight, int(self.counts[name]))

    def __contains__(self, name: object) -> bool:  # Mapping's would read the weight
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
