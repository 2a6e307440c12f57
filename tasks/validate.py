"""The validate step (dvc.yaml stage validate): TRANSITIONAL re-export of the library entry."""

from medflow.data.expectations import run

__all__ = ["run"]
