"""The exception types export raises for bad input, so CLIs can turn them into one line."""

from __future__ import annotations

from pipelines.errors import UserError


class ExportError(UserError):
    """An artifact, request or setting that cannot be used. The message is one line naming the file or option."""


class BackendUnavailable(ExportError):
    """The backend's runtime (or a feature of it) is not installed or not usable on this machine."""
