"""The error every checkpoint reader raises: its message names the file and what is wrong."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names what is wrong."""
