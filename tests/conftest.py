"""pytest puts this folder on ``sys.path`` (it holds a conftest.py and no ``__init__.py``), so the helpers
here (``dist_utils``, ``integration_utils``) import the same way from ``tests/`` and from ``tests/gpu/``,
whether one file or the whole suite is run."""
