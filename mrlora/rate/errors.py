"""RaTE errors, torch-free so CLIs (and the launcher) can catch and print them without heavy imports.

Every message names what is wrong and what to do next; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

from mrlora.cli import UserError


class RateError(UserError):
    """Base class of every RaTE problem a user must act on."""


class TokenExistsError(RateError):
    """The requested token string is already in a tokenizer's vocabulary (it would not be a new embedding)."""


class TeacherMismatchError(RateError):
    """The expert adapter was trained on a different base (arch, base id or tensor shapes disagree)."""


class TokenFileError(RateError):
    """A saved token file is unreadable, or does not fit the pipeline it is loaded into."""


class UnknownTokenError(RateError):
    """A token spec names a token that was not loaded."""


class TokenSpecError(RateError):
    """A token spec is malformed (bad repeat count or scale)."""
