"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class FarclussError(Exception):
    """Base class of errors caused by user input (config, files, checkpoints)."""


class ConfigError(FarclussError):
    """A config key is unknown, has the wrong type or an invalid value."""


class DataError(FarclussError):
    """A dataset file (image, mask, split list, class list) is missing or malformed."""


class CheckpointError(FarclussError):
    """A checkpoint or weight file cannot be loaded safely or does not match the model."""


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (whitespace runs collapsed); its type name when empty."""
    return " ".join(str(error).split()) or type(error).__name__
