"""The resize step (dvc.yaml stage resize): TRANSITIONAL re-export of the library entry."""

from medflow.imaging.resize import run

__all__ = ["run"]
