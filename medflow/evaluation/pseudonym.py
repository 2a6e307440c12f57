"""Pseudonyms for what users share (``evaluate.pseudonymize``): file names and patient ids as salted hashes.

Hospital file names often carry record numbers, and patient ids are identifiers. With ``evaluate.pseudonymize:
true`` the report, model card, summary, predictions.csv and the Prefect artifacts show ``img-<hash>.<ext>``
and ``pt-<hash>`` instead (HMAC-SHA256 under a per-project key, first 12 hex digits). The key is the project's
secret, made once per checkout in ``.dvc/tmp/medflow/salt`` (the DICOM patient hashes' salt too; git-ignored by
DVC, never committed or pushed), so a file or patient keeps its pseudonym across runs of one project, and another
project cannot link them.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from medflow.patients import SALT_FILE, project_salt

KEY_FILE = SALT_FILE  # one secret per project: the DICOM patient hashes and these pseudonyms
_DIGITS = 12


def project_key(project: Path | str = ".") -> bytes:
    """The project's secret (:func:`medflow.patients.project_salt`, ``.dvc/tmp/medflow/salt``), made on first use."""
    key = project_salt(project)
    if len(key) < 32:
        raise ValueError(f"{Path(project) / KEY_FILE}: the project's secret is empty or truncated; delete it to make "
                         "a new one (pseudonyms of earlier reports and DICOM patient ids will then differ)")
    return key


@dataclass(frozen=True)
class Pseudonymizer:
    """Salted hashes of file names and patient ids; ``key=None`` leaves every value as it is."""

    key: bytes | None = None

    @property
    def on(self) -> bool:
        return self.key is not None

    def _hash(self, kind: str, value: str) -> str:
        assert self.key is not None
        return hmac.new(self.key, f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()[:_DIGITS]

    def path(self, value: object) -> str:
        """``img-<hash><suffix>`` for a file path (the whole path is hashed; only the extension is kept)."""
        text = str(value)
        if not self.on or not text:
            return text
        return f"img-{self._hash('path', text)}{PurePosixPath(text).suffix.lower()}"

    def patient(self, value: object) -> str:
        """``pt-<hash>`` for a patient/group id."""
        text = str(value)
        return f"pt-{self._hash('patient', text)}" if self.on and text else text

    def text(self, value: object, paths: list[str]) -> str:
        """``value`` with each of ``paths`` (and its file name) in it replaced by its pseudonym: error details
        quote the file they are about."""
        text = str(value)
        if not self.on:
            return text
        for p in sorted(paths, key=len, reverse=True):
            if p:
                text = text.replace(p, self.path(p)).replace(PurePosixPath(p).name, self.path(p))
        return text


def pseudonymizer(enabled: bool, project: Path | str = ".") -> Pseudonymizer:
    """The project's pseudonymizer when ``enabled`` (evaluate.pseudonymize), else one that changes nothing."""
    return Pseudonymizer(project_key(project) if enabled else None)
