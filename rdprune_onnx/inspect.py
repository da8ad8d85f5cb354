"""What ``rdprune-onnx inspect`` reports: the model's inputs, outputs and prunable layers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from rdprune_onnx.calibration import InputSpec, model_inputs
from rdprune_onnx.graph.layers import LayerScan, find_layers
from rdprune_onnx.graph.load import load_model


@dataclass
class ModelSummary:
    path: str
    opsets: dict[str, int]
    producer: str
    inputs: list[InputSpec]
    outputs: list[str]
    scan: LayerScan

    @property
    def prunable_weights(self) -> int:
        return sum(layer.size for layer in self.scan.layers)

    def rows(self) -> list[dict[str, Any]]:
        """One row per layer, prunable or not, in graph order of discovery."""
        rows: list[dict[str, Any]] = [
            {
                "layer": layer.name,
                "op": "/".join(layer.op_types),
                "shape": list(layer.shape),
                "params": layer.size,
                "sparsity": layer.sparsity,
                "dtype": layer.dtype,
                "storage": layer.storage,
                "uses": len(layer.uses),
                "in_subgraph": layer.in_subgraph,
                "prunable": True,
                "reason": None,
            }
            for layer in self.scan.layers
        ]
        rows += [
            {
                "layer": s.node,
                "tensor": s.tensor,
                "op": s.op_type,
                "node": s.node,
                "shape": list(s.shape) if s.shape else None,
                "params": None,
                "sparsity": None,
                "prunable": False,
                "reason": s.reason,
            }
            for s in self.scan.skipped
        ]
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "producer": self.producer,
            "opsets": self.opsets,
            "inputs": [
                {"name": i.name, "dtype": i.dtype.name, "shape": list(i.shape or [])}
                for i in self.inputs
            ],
            "outputs": self.outputs,
            "prunable_layers": len(self.scan.layers),
            "prunable_weights": self.prunable_weights,
            "layers": self.rows(),
        }


def inspect_model(path: str | os.PathLike[str]) -> ModelSummary:
    model = load_model(path)
    return ModelSummary(
        path=str(path),
        opsets={o.domain or "ai.onnx": o.version for o in model.opset_import},
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        inputs=model_inputs(model),
        outputs=[o.name for o in model.graph.output],
        scan=find_layers(model),
    )
