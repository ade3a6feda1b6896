"""The exceptions users see.

Every message answers three questions: what went wrong, where (file, field, image id), and what to do.
The CLI catches `MedsslError` and prints it without a traceback; anything else is a bug in medssl.
"""
from __future__ import annotations


class MedsslError(Exception):
    """Base class: a problem the user can fix."""

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.render())

    def render(self) -> str:
        parts = [self.what]
        if self.where:
            parts.append(f"  where: {self.where}")
        if self.fix:
            parts.append(f"  what to do: {self.fix}")
        return "\n".join(parts)


class ConfigError(MedsslError):
    """A configuration file or override is invalid."""


class DataError(MedsslError):
    """Input images, manifests or labels cannot be used."""


class TrainingError(MedsslError):
    """Training cannot go on (non-finite loss, out of memory, bad checkpoint)."""


class TrackingError(MedsslError):
    """MLflow cannot be reached or refuses a request, and the work cannot go on without it."""
