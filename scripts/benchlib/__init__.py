"""Helpers shared by the benchmarks in scripts/ (written once here instead of copied).

* :mod:`benchlib.records`: where results go (``results/``), atomic JSON and text writes after
  every row, resuming from earlier records, and the machine / load / version records.
* :mod:`benchlib.data`: calibration files cut to fewer samples or tokens, calibration batches.
* :mod:`benchlib.scoring`: the shipped tasks' scores on an ONNX Runtime session: digits top-1
  accuracy, the recognizer's character error rate, MiniLM retrieval recall@1 / MRR / cosine.
* :mod:`benchlib.peers`: onnxsim's pruning passes, run on the same calibration batches.
* :mod:`benchlib.tables`: Markdown tables with one column per sparsity ratio.

Scripts import it as ``import benchlib`` or ``from benchlib.records import ...``: a script run
as ``python scripts/NAME.py`` has scripts/ on ``sys.path``. Only public names of the library
are used here.
"""
