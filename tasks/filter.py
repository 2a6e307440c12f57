"""The filter step (dvc.yaml stage filter): TRANSITIONAL re-export of the library entry."""

from medflow.imaging.quality import run

__all__ = ["run"]
