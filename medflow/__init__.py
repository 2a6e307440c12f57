"""medflow: validated, versioned medical-image datasets and evaluated binary classifiers (DVC + Prefect).

The installed library. It never imports Prefect, ``tasks/`` or ``flows/``: only :mod:`medflow.cli` loads
those, from the project root, at run time.
"""

__version__ = "0.2.0"
