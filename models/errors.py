"""Typed errors that tell the user what to fix.

Library code raises these; the CLI turns them into a one-line message and exit code 2.
"""


class UplvpError(Exception):
    """Base class for every error this package raises on purpose; `code` is what the service's
    job record calls it."""

    code = "invalid_input"


class DataError(UplvpError):
    """A dataset, annotation file or image is missing, unreadable or inconsistent.

    The message always names the file and the problem, e.g.
    ``train.json: annotation 17 points at image id 99, which is not in 'images'``.
    """


class NoPseudoMasksError(DataError):
    """Masks Proposal found nothing to pre-train on in the whole pool."""

    code = "no_pseudo_masks"


class CheckpointError(UplvpError):
    """A checkpoint is missing, corrupt, or incompatible with what was asked."""


class ConfigError(UplvpError):
    """A configuration value is invalid (the message names the field)."""
