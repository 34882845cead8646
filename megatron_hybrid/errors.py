"""The error types every floor of the package raises (here, at the bottom, so that the lower
floors — kernels, parallel, layers — can raise them without importing a higher one)."""


class ConfigError(ValueError):
    """A model or parallel config that cannot work; the message names the field and value."""
