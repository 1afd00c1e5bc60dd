"""One exception type for unusable input data, so callers can tell it from bugs."""


class DataError(RuntimeError):
    """The data on disk (or behind a URL) cannot be used as it is: corrupt, missing or inconsistent.

    Raised with a message that names the file and says what to do; it takes a single string
    argument so that torch's DataLoader can re-raise it from a worker process.
    """
