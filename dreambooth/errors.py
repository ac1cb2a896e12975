"""Exceptions with messages written for the person who has to fix the problem."""


class DreamBoothError(Exception):
    """Base class: the message says what is wrong, where, and what to do."""


class ModelFileError(DreamBoothError, ValueError):
    """A model file or folder cannot be read or is not a Stable Diffusion model we understand."""


class UnsafeCheckpointError(ModelFileError):
    """A ``.ckpt`` contains pickled objects other than tensors and plain containers; it was not executed."""
