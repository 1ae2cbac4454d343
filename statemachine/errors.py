"""One base error, and a subclass for each kind of failure a caller handles differently."""


class ComfyDualError(Exception):
    """Base of every error comfy-dual raises on purpose."""


class BadInput(ComfyDualError):
    """A prompt file (or command) that cannot be accepted; the message says why."""


class BadConfig(ComfyDualError):
    """A setting with a wrong value; the message names the key, the value and the fix."""


class CorruptLog(ComfyDualError):
    """The event log cannot be trusted (a bad line in the middle, an impossible event)."""


class IllegalTransition(ComfyDualError):
    """A state change the job or batch state machine does not allow: always a bug."""


class PermanentDispatchError(ComfyDualError):
    """The server refused the job for a reason retrying cannot fix (invalid workflow)."""


class TransientDispatchError(ComfyDualError):
    """The job failed in a way that may succeed on another attempt (execution error)."""


class ServerError(TransientDispatchError):
    """The server answered with a failure of its own (HTTP 5xx, an answer that cannot be
    read): a problem of the instance, not of the job, like ``InstanceUnreachable``."""


class InstanceUnreachable(ComfyDualError):
    """The server could not be reached: a problem of the instance, not of the job."""


class LogWriteError(ComfyDualError):
    """The event log could not be written (disk full, read-only): dispatch must stop."""
