"""Errors a user can cause. Their message is one sentence fit to show as it is."""


class UserError(Exception):
    """A problem with the user's input or environment, not a bug."""


class CheckpointError(UserError):
    """A checkpoint that cannot be found, read or trusted."""
