"""Exceptions with messages written for the person who has to fix the problem."""


class DreamBoothError(Exception):
    """Base class: the message says what is wrong, where, and what to do."""


class ModelFileError(DreamBoothError, ValueError):
    """A model file or folder cannot be read or is not a Stable Diffusion model we understand."""


class UnsafeCheckpointError(ModelFileError):
    """A pickle asks for objects other than tensors, plain containers and the WebUI's allowed training extras;
    it was not executed."""


class UnsupportedModelError(ModelFileError):
    """A model of a family that cannot be trained yet (SDXL, SD3, Flux, ...); the message names the family."""


def one_line(error: BaseException, limit: int = 400) -> str:
    """A library's multi-line message (e.g. load_state_dict's key lists) as one line of at most ``limit`` chars."""
    text = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."
