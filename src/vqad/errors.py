"""The library's own error types.

Every problem caused by the user's input (a bad mesh, a bad argument, a corrupt file) raises a
subclass of :class:`VqadError`. The CLI prints its message on one line and exits with code 2; a
traceback means a bug in vqad, not in the input.
"""


class VqadError(Exception):
    """A problem with the user's input or environment; the message says what to do."""


class InputError(VqadError):
    """An input file or argument is missing, unreadable or invalid."""


class TrainingDivergedError(VqadError):
    """Training produced non-finite losses or gradients step after step; the message says what to lower."""


class StreamError(VqadError):
    """A .vqad stream cannot be decoded."""


class TruncatedStreamError(StreamError):
    """The stream ended before the first complete level of detail (or inside a header); where the whole stream
    was asked for (``fileformat.load(..., whole=True)``: re-encoding it), before its last."""


class CorruptStreamError(StreamError):
    """The stream is damaged: bad magic, unknown version, CRC mismatch or impossible sizes."""


class StreamLimitError(StreamError):
    """The stream describes a model larger than the decoder's memory limit (``max_memory``)."""


class ShortPrefixWarning(UserWarning):
    """The first ``max_bytes`` bytes of a .vqad stream end before the LOD asked for: a coarser one is used (the
    command line makes it an error naming ``--bytes``)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt is (so a killed fit saves its checkpoint the same way);
    the CLI exits with 143 (128 + SIGTERM) for it, 130 for Ctrl-C."""


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end was closed (``| head`` exited): polling its writing end reports
    an error. A BrokenPipeError is this only then; another pipe broke otherwise."""
    import select
    import sys

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no poll here, or stdout is not a file (captured)
        return False
