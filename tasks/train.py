"""The train step (dvc.yaml stage train): TRANSITIONAL re-export of the library entry."""

from medflow.training.fit import run

__all__ = ["run"]
