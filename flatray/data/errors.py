"""DataError, in a module of its own: the loaders and flatray.data.pypi both raise it without importing each other."""


class DataError(RuntimeError):
    """Data could not be loaded or has the wrong layout; the message says how to fix it."""
