"""scripts/benchmark_methods.py in parts: :mod:`.tasks` (which model, calibration data, scorer
and rows), :mod:`.runner` (prune, measure and refit every row), :mod:`.report` (the analysis and
``benchmark.md``) and :mod:`.plot` (``benchmark_methods.png``). Helpers shared with the other
benchmarks are in scripts/benchlib/."""
