"""Error types that the CLI turns into one clear line and an exit code."""


class UserError(Exception):
    """A mistake in the user's input (a file, a flag, a YAML key): exit code 2, one line on stderr."""


class CheckFailed(Exception):
    """A result failed its own check (e.g. ONNX parity, a runtime's mAP below the torch mAP): exit code 1,
    one line on stderr naming what and by how much."""
