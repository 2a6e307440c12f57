"""The split step (dvc.yaml stage split): TRANSITIONAL re-export of the library entry."""

from medflow.data.split import run

__all__ = ["run"]
