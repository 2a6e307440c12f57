"""The extract step (dvc.yaml stage extract): TRANSITIONAL re-export of the library entry."""

from medflow.data.archives import run

__all__ = ["run"]
