"""`sweep` and `prune --max-drop / --max-distortion` through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from rdprune_onnx_cli.main import cli

MODELS = Path(__file__).resolve().parent.parent.parent / "models"
DIGITS = [
    str(MODELS / "digits_cnn.onnx"),
    "--data",
    str(MODELS / "digits_calib.npz"),
    "--levels",
    "21",
    "--no-progress",
]
EVAL = ["--eval-data", str(MODELS / "digits_test.npz"), "--labels", "label"]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_sweep_on_digits_writes_table_json_and_png(tmp_path: Path) -> None:
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    args = ["sweep", *DIGITS, *EVAL, "--ratios", "0.5,0.9", "--method", "rd,lamp"]
    code, text = run(*args, "-o", str(out), "--plot", str(png))
    assert code == 0, text
    assert "dense accuracy: 0.9889 on 450 held-out samples" in text
    assert text.count("\nrd ") == 2 and text.count("\nlamp ") == 2
    data = json.loads(out.read_text())
    points = {(p["method"], p["ratio"]): p for p in data["points"]}
    assert set(points) == {("rd", 0.5), ("rd", 0.9), ("lamp", 0.5), ("lamp", 0.9)}
    # At 0.5 nothing is lost; at 0.9 without refit both lose accuracy, LAMP more than rd.
    assert points["rd", 0.5]["drop"] < 0.01 and points["lamp", 0.5]["drop"] < 0.01
    assert points["lamp", 0.9]["metric"] < points["rd", 0.9]["metric"] < 0.98
    assert png.read_bytes()[:4] == b"\x89PNG"
    # A second run reads every point from the cache, and refuses to replace files.
    code, text = run(*args, "-o", str(out))
    assert code == 1 and text.startswith("Error:") and "--force" in text
    code, text = run(*args)
    assert code == 0 and "4 from the cache" in text


def test_max_drop_on_digits_reports_probes_and_the_failing_ratio(tmp_path: Path) -> None:
    out, report = tmp_path / "d.onnx", tmp_path / "d.json"
    code, text = run(
        "prune", *DIGITS, *EVAL, "--max-drop", "0.01", "-o", str(out), "--report", str(report)
    )
    assert code == 0, text
    search = json.loads(report.read_text())["search"]
    chosen, failing = search["chosen_ratio"], search["next_failing_ratio"]
    assert 0.5 < chosen < 0.95 and failing == pytest.approx(chosen + 0.01)
    assert f"chosen ratio {chosen:.4g}" in text and f"next ratio up {failing:.4g} failed" in text
    assert search["chosen_value"] <= 0.01
    assert next(p for p in search["probes"] if p["ratio"] == failing)["value"] > 0.01
    assert out.is_file()
    assert json.loads(report.read_text())["evaluation"]["pruned_accuracy"] >= 0.9889 - 0.01


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--ratio", "0.5", "--max-drop", "0.01", *EVAL],
            "--ratio and --max-drop are alternatives",
        ),
        (["--max-drop", "0.01"], "--max-drop needs held-out data"),
        (["--max-drop", "0.01", "--max-distortion", "1", *EVAL], "are alternatives"),
        (["--ratio", "0.5", "--max-distortion", "1"], "--ratio and --max-distortion"),
        ([], "give --ratio, or a quality target"),
        (["--ratio", "0.5", "--quality-metric", "cosine"], "--quality-metric applies to"),
        (["--max-drop", "0.01", *EVAL, "--search-range", "0.9:0.5"], "search range"),
        (["--max-drop", "0.01", "--eval-data", EVAL[1], "--quality-metric", "accuracy"], "labels"),
        (["--max-drop", "0.01", *EVAL, "--steps", "2"], "--steps"),
    ],
)
def test_wrong_combinations_are_one_line_errors(
    tmp_path: Path, args: list[str], message: str
) -> None:
    code, text = run("prune", *DIGITS, "-o", str(tmp_path / "p.onnx"), *args)
    assert code == 1, text
    assert text.startswith("Error:") and message in text
    assert len(text.strip().splitlines()) == 1 and "Traceback" not in text
    assert not (tmp_path / "p.onnx").exists()


def test_sweep_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    for args, message in (
        (["--ratios", "0.5:0.2:0.1"], "--ratios"),
        (["--method", "rd,nope"], "unknown method"),
        (["--quality-metric", "accuracy", "--eval-data", EVAL[1]], "labels"),
    ):
        extra = [] if "--eval-data" in args else EVAL
        code, text = run("sweep", *DIGITS, *extra, *args)
        assert code == 1 and text.startswith("Error:") and message in text, text
        assert len(text.strip().splitlines()) == 1
