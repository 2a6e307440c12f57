"""The evaluate step (dvc.yaml stage evaluate): TRANSITIONAL re-export of the library entry."""

from medflow.evaluation.assess import run

__all__ = ["run"]
