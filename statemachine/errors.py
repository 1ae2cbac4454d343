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


class InstanceTrouble(ComfyDualError):
    """A problem of the instance, not of the job: the caller marks the server down and
    asks about the job again once it is back, instead of failing the job."""


class InstanceUnreachable(InstanceTrouble):
    """The server could not be reached (refused, reset, timed out)."""


class ServerError(InstanceTrouble):
    """The server answered with a failure of its own (HTTP 5xx, an answer that cannot be
    read)."""


class LogWriteError(ComfyDualError):
    """The event log could not be written (disk full, read-only): dispatch must stop."""
