from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rdprune_onnx import calibration as calib
from rdprune_onnx.errors import UserError
from tests import graphs


def specs() -> list[calib.InputSpec]:
    return calib.model_inputs(graphs.cnn())


def test_model_inputs_exclude_initializers() -> None:
    (spec,) = specs()
    assert spec.name == "x"
    assert spec.dtype == np.float32
    assert spec.shape == ("N", 3, 8, 8)


def test_check_data_accepts_matching_arrays() -> None:
    x = np.zeros((5, 3, 8, 8), np.float32)
    assert calib.check_data({"x": x}, specs(), "d")["x"] is x


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"y": np.zeros((5, 3, 8, 8), np.float32)}, "lacks input"),
        ({"x": np.zeros((5, 3, 8, 8), np.float64)}, "dtype float64"),
        ({"x": np.zeros((5, 3, 8, 9), np.float32)}, "3x8x9"),
        ({"x": np.full((5, 3, 8, 8), np.nan, np.float32)}, "NaN"),
        ({"x": np.zeros((0, 3, 8, 8), np.float32)}, "no samples"),
    ],
)
def test_check_data_errors_list_expectations(data: dict[str, np.ndarray], needle: str) -> None:
    with pytest.raises(UserError, match=needle) as info:
        calib.check_data(data, specs(), "calib.npz")
    if needle not in ("NaN", "no samples"):
        assert "x: float32[Nx3x8x8]" in str(info.value)


def test_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserError, match="pickled"):
        calib.load_npz(path)


def test_npz_that_is_not_npz(tmp_path: Path) -> None:
    path = tmp_path / "p.npz"
    path.write_text("hello")
    with pytest.raises(UserError, match="cannot read"):
        calib.load_npz(path)


def test_synthetic_is_seeded_standard_normal() -> None:
    a = calib.synthesize(specs(), 64, seed=3)["x"]
    b = calib.synthesize(specs(), 64, seed=3)["x"]
    c = calib.synthesize(specs(), 64, seed=4)["x"]
    assert a.shape == (64, 3, 8, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert abs(float(a.mean())) < 0.05 and abs(float(a.std()) - 1) < 0.05


def test_synthetic_dynamic_dims_need_a_shape() -> None:
    spec = [calib.InputSpec("t", np.dtype(np.float32), ("N", "T", 4))]
    with pytest.raises(UserError, match="--input-shape t"):
        calib.synthesize(spec, 4)
    shapes = calib.parse_input_shapes(["t:1x7x4"])
    assert calib.synthesize(spec, 4, shapes=shapes)["t"].shape == (4, 7, 4)
    with pytest.raises(UserError, match="does not fit"):
        calib.synthesize(spec, 4, shapes=calib.parse_input_shapes(["t:1x7x5"]))


def test_synthetic_integer_inputs_need_a_range() -> None:
    spec = [calib.InputSpec("ids", np.dtype(np.int64), ("N", 6))]
    with pytest.raises(UserError, match="--input-range ids"):
        calib.synthesize(spec, 4)
    ids = calib.synthesize(spec, 100, ranges=calib.parse_input_ranges(["ids:5:9"]))["ids"]
    assert ids.dtype == np.int64 and ids.min() >= 5 and ids.max() <= 8


@pytest.mark.parametrize("text", ["x", "x:", "x:1xa", ":1x2", "x:0x3"])
def test_bad_shape_strings(text: str) -> None:
    with pytest.raises(UserError, match="NAME:DIMS"):
        calib.parse_input_shapes([text])


def test_batches_cover_all_samples() -> None:
    data = {"x": np.arange(10)[:, None].astype(np.float32)}
    cut = list(calib.batches(data, 4))
    assert [len(b["x"]) for b in cut] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in cut]), data["x"])
