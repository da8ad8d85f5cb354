"""plot_result: from a report dict (live or read back from JSON) to an image file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import pytest

from rdprune_onnx.errors import UserError
from rdprune_onnx.pipeline import CalibrationSpec, PruneSettings, prune
from rdprune_onnx.plot import DPI, FIGSIZE, distinct_parts, plot_result, read_report, short_name
from tests import graphs
from tests.graphs_eval import needs_matplotlib, png_size, report

pytestmark = needs_matplotlib


@pytest.mark.parametrize("n", [1, 5, 54])
def test_png_of_expected_size(tmp_path: Path, n: int) -> None:
    out = plot_result(report(n), tmp_path / "plot.png")
    assert out == tmp_path / "plot.png"
    assert out.stat().st_size > 10_000
    assert png_size(out) == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]  # no temp file left


def test_size_and_dpi(tmp_path: Path) -> None:
    out = plot_result(report(3), tmp_path / "small.png", size=(6.0, 4.0), dpi=50)
    assert png_size(out) == (300, 200)


def test_without_curves_and_other_formats(tmp_path: Path) -> None:
    assert png_size(plot_result(report(20, curves=False), tmp_path / "bars.png")) == (1200, 900)
    svg = plot_result(report(4), tmp_path / "plot.svg")
    assert svg.read_text().lstrip().startswith("<?xml")


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "plot.png"
    out.write_bytes(b"precious")
    with pytest.raises(UserError, match="already exists"):
        plot_result(report(3), out)
    assert out.read_bytes() == b"precious"
    plot_result(report(3), out, force=True)
    assert png_size(out) == (1200, 900)


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a prune report"):
        plot_result({"layers": []}, tmp_path / "a.png")
    with pytest.raises(UserError, match="not a prune report"):
        plot_result({"layers": [{"name": "w"}]}, tmp_path / "a.png")
    bad_curve = report(2)
    bad_curve["curves"][bad_curve["layers"][0]["name"]]["distortion"] = [1.0]
    with pytest.raises(UserError, match="mismatched"):
        plot_result(bad_curve, tmp_path / "a.png")
    with pytest.raises(UserError, match="image format"):
        plot_result(report(2), tmp_path / "plot.unknown")
    with pytest.raises(UserError, match="does not exist"):
        plot_result(report(2), tmp_path / "missing" / "plot.png")
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(UserError, match=r"pip install 'rdprune-onnx\[plot\]'"):
        plot_result(report(2), tmp_path / "plot.png")


def test_from_a_live_result_and_its_saved_report(tmp_path: Path) -> None:
    model = tmp_path / "cnn.onnx"
    onnx.save_model(graphs.cnn(), str(model))
    result = prune(
        model,
        PruneSettings(ratio=0.6, levels=11, provider="cpu"),
        CalibrationSpec(synthetic=8),
        write=False,
        report=tmp_path / "report.json",
        cache_dir=None,
    )
    assert png_size(plot_result(result, tmp_path / "live.png")) == (1200, 900)
    saved = read_report(tmp_path / "report.json")
    assert png_size(plot_result(saved, tmp_path / "saved.png")) == (1200, 900)


def test_read_report_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        read_report(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(UserError, match="as JSON"):
        read_report(broken)
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps([1, 2]))
    with pytest.raises(UserError, match="not a prune report"):
        read_report(listing)


def test_short_name() -> None:
    assert short_name("conv1.weight") == "conv1.weight"
    cut = short_name("/model/encoder/layer.11/attention/self/query/MatMul", 20)
    assert len(cut) == 20 and cut.startswith("/model…") and cut.endswith("/query/MatMul")


def test_distinct_parts() -> None:
    names = [
        "/enc/layer.0/attn/query/MatMul_w",
        "/enc/layer.0/attn/key/MatMul_w",
        "/enc/layer.1/fc/MatMul_w",
    ]
    assert distinct_parts(names) == (
        "/enc/layer.",
        ["0/attn/query", "0/attn/key", "1/fc"],
        "/MatMul_w",
    )
    assert distinct_parts(["conv1.weight", "fc1.weight"]) == ("", ["conv1", "fc1"], ".weight")
    assert distinct_parts(["only.weight"]) == ("", ["only.weight"], "")
    assert distinct_parts(["x.weight", "x.weight.1"]) == ("x.", ["weight", "weight.1"], "")
    assert distinct_parts(["w", "w"]) == ("", ["w", "w"], "")
