"""Errors a user can cause. Their message is one sentence fit to show as it is."""

OUT_OF_MEMORY = "out of memory; use a higher compression ratio or a shorter document"


class UserError(Exception):
    """A problem with the user's input or environment, not a bug."""


class CheckpointError(UserError):
    """A checkpoint that cannot be found, read or trusted."""


class OutOfMemory(UserError):
    """A request needed more memory than the device (or the host) had; the request's memory
    has been released and the next request can run."""

    def __init__(self, message: str = OUT_OF_MEMORY):
        super().__init__(message)
