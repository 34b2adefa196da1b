"""The one error hierarchy of celebctl.

Every error a user can cause or fix is a :class:`CelebctlError`; its message says what happened
and what to do next. The CLI prints ``Error: <message>`` and exits 1 for any of them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CelebctlError(Exception):
    """Base class: an error with a message a person can act on."""


class InvalidName(CelebctlError):
    """An identity name that a prompt could not carry or that is unsafe on disk."""


class IdentityNotFound(CelebctlError):
    """No identity of that name in the registry."""

    def __init__(self, name: str, known: Iterable[str] = ()):
        self.name = name
        message = f"No identity '{name}'."
        hint = did_you_mean(name, known)
        if hint:
            message += f" Did you mean '{hint}'?"
        message += " See `celebctl list`."
        super().__init__(message)


class IdentityExists(CelebctlError):
    """The target name is already taken."""


class IdentityChanged(CelebctlError):
    """An identity changed or vanished on disk while a command that read it was running."""


class CorruptEntry(CelebctlError):
    """A registry entry on disk is damaged (missing file, bad TOML, checksum mismatch)."""


class SchemaError(CelebctlError):
    """A TOML file of an unknown or future schema version, or with wrong types."""


class BundleError(CelebctlError):
    """An identity bundle (.celeb) that is unsafe or malformed; nothing was written."""


class RegistryBusy(CelebctlError):
    """Another celebctl process holds the writer lock for too long."""


class StorageError(CelebctlError):
    """A write failed (disk full, read-only data home, permissions); nothing was half-written."""


class BasisNotFound(CelebctlError):
    """No basis with that id."""


class BasisMismatch(CelebctlError):
    """A model or identity does not fit the basis it is used with."""


class BasisInUse(CelebctlError):
    """A basis that identities still refer to."""


class FetchError(CelebctlError):
    """A download failed or a fetched file was refused; nothing was written."""


class ModelUnavailable(CelebctlError):
    """A model cannot be loaded (not cached, offline, wrong path, bad file)."""


class InvalidOption(CelebctlError):
    """An option value that cannot work (device, dtype, resolution, ...)."""


class PhotoError(CelebctlError):
    """A photo that cannot be read or is unsafe to decode."""


class NoFaceFound(CelebctlError):
    """No face was detected in a photo."""


class FaceEncoderUnavailable(CelebctlError):
    """The face-recognition weights are not on this machine."""


class PromptError(CelebctlError):
    """A prompt that cannot be rendered as written."""


class FitError(CelebctlError):
    """A fit that cannot start or that failed (for example non-finite loss)."""


class LoraError(CelebctlError):
    """A LoRA that cannot be used: not found, not a LoRA, or made for another model family."""


class ProcessesMissing(CelebctlError):
    """A process of a multi-process job never arrived, or stopped answering."""


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """Return the closest candidate to ``word``, or None when nothing is close."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None
