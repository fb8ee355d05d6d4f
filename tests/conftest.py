"""pytest puts this folder on ``sys.path`` (it holds a conftest.py and no ``__init__.py``), so the helpers
here (``dist_utils``, ``integration_utils``) import the same way from ``tests/`` and from ``tests/gpu/``,
whether one file or the whole suite is run. ``benchmarks/`` goes on the path too: the document-length mixes
(``mixes``) and the benchmark harnesses the tests check live there, outside the package."""

import sys
from pathlib import Path

BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)
