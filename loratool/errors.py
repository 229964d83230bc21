"""The library's one exception hierarchy. Imports nothing.

Every error carries a one-line message; ``str(err)`` is ``<file>: <tensor>: <what>`` with the
parts that are known. The CLI prints it after ``error: `` and exits 1.
"""

from __future__ import annotations


class LoratoolError(Exception):
    """Base of every error loratool raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        file: object | None = None,
        tensor: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = " ".join(str(message).split())
        self.file = None if file is None else str(file)
        self.tensor = tensor
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.tensor) if p]
        text = ": ".join([*parts, self.message])
        if self.hint:
            text += f" ({self.hint})"
        return text


class FormatError(LoratoolError):
    """A file is not what it claims: corrupt, truncated, lying header, pickle, unknown layout."""


class ValidationError(LoratoolError):
    """Well-formed input that cannot be used: bad ranks, NaN/Inf, shapes that do not fit."""


class ResolutionError(LoratoolError):
    """An adapter module matches no base tensor, or more than one."""


class NotFoundError(LoratoolError):
    """A name or path that does not exist."""


class CatalogError(LoratoolError):
    """The catalog database or blob store refuses or is inconsistent."""


class OutputExistsError(LoratoolError):
    """An output path exists and --force was not given."""


class HubError(LoratoolError):
    """The Hugging Face Hub refused or could not be reached."""


class MissingDependencyError(LoratoolError):
    """An optional extra is needed (matplotlib for --plot)."""
