"""The project's exception types.

Every error raised for bad input or a configuration that cannot work is one of
these, with a message that says what to change. The CLI prints them as one line
and the HTTP layer maps them to 4xx responses. This module imports nothing but
the standard library, so the torch-free runtime can use it too.
"""

from __future__ import annotations


class GlassesVisionError(Exception):
    """Base class of every error this project raises on purpose."""

    #: HTTP status the service answers with when this error reaches it.
    http_status: int = 400


class ConfigError(GlassesVisionError, ValueError):
    """A setting, or a combination of settings, that cannot work."""

    http_status = 422


class DataError(GlassesVisionError, ValueError):
    """A dataset, image or label file that cannot be used as it is."""

    http_status = 422


class ModelError(GlassesVisionError):
    """A model that cannot be built, loaded or changed as asked."""


class CheckpointError(ModelError):
    """A weight file or checkpoint directory that is missing, corrupt or mismatched."""


class UntrustedCheckpointError(CheckpointError):
    """A pickled checkpoint was given without explicit trust."""


class ExportError(GlassesVisionError):
    """Export, verification or quantization failed."""


class NotFoundError(GlassesVisionError, LookupError):
    """A named thing (model, job, adapter, registry entry) does not exist."""

    http_status = 404
