"""The one exception type of `ldmkit.data`."""


class DataError(ValueError):
    """A data set cannot be read; the one-line message names the file or folder and the fix."""
