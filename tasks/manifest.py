"""The manifest step (dvc.yaml stage manifest): TRANSITIONAL re-export of the library entry."""

from medflow.data.manifest import run

__all__ = ["run"]
