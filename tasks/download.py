"""The download step (dvc.yaml stage download): TRANSITIONAL re-export of the library entry."""

from medflow.data.fetch import run

__all__ = ["run"]
