"""Errors that reach users. Each message names the file, key, field or limit at fault."""


class PixtralError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class ConfigError(PixtralError, ValueError):
    """A config file (params.json / config.json) or a config value is invalid."""


class CheckpointError(PixtralError, ValueError):
    """A checkpoint is missing, truncated, or does not match its config."""


class ImageError(PixtralError, ValueError):
    """An image cannot be loaded: missing, not an image, truncated, too large, not allowed."""


class ImageTooLargeError(ImageError):
    """An image is over a pixel or byte limit (HTTP 413 in the server)."""


class RequestError(PixtralError, ValueError):
    """A chat request (messages, sampling parameters) is invalid."""


class ContextLengthError(RequestError):
    """A prompt, or prompt plus requested tokens, exceeds the model's context length."""
