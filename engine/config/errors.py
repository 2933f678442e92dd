"""The one error type for bad run configuration."""


class ConfigError(ValueError):
    """A run configuration or DeepSpeed JSON is invalid.

    The message always names where the bad value came from (a file path or ``command line``) and the dotted
    key, so the user knows exactly what to edit.
    """

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.key = key
        self.source = source
