"""The ``vqad`` command line.

Each group of subcommands lives in its own module with a ``register(subparsers)`` function that
adds its parsers and sets ``func`` to a handler ``(args) -> int``. User errors raise
:class:`~vqad.errors.VqadError`: printed on one line, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import warnings

from vqad.errors import Terminated, VqadError, stdout_reader_gone

# modules that add subcommands; each defines register(subparsers)
COMMAND_MODULES = [
    "vqad.app.commands.sdf",
    "vqad.app.commands.nerf",
    "vqad.app.commands.format",
    "vqad.app.commands.compress",
    "vqad.app.commands.sweep",
    "vqad.app.commands.batch",
    "vqad.app.commands.tsdf",
    "vqad.app.commands.rgbd",
    "vqad.app.commands.serve",
    "vqad.app.commands.view",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: one line, exit 2
        self.print_usage(sys.stderr)
        if message.endswith("expected one argument"):  # "--bandwidth -1Mbit": argparse took the value for a flag
            message += " (a value that starts with '-' goes after '=', e.g. --flag=-1)"
        print(f"vqad: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vqad", description="Variable bitrate neural fields (VQ-AD): fit, compress, stream, render.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for cmd in sub.choices.values():  # one thread policy for every command
        if "--threads" in cmd._option_string_actions:  # a command that says what its threads are (batch: per fit)
            continue
        cmd.add_argument("--threads", type=str, default=None, metavar="N",
                         help="CPU threads for PyTorch (default: $VQAD_THREADS, else $OMP_NUM_THREADS, else every "
                              "core this process may use; running several jobs at once, give each cores / jobs)")
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line for the command's user (not Python's source path and code line)."""
    print(f"vqad: warning: {message}", file=sys.stderr if file is None else file, flush=True)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # imports the commands' modules (PyTorch): a second or more
    except KeyboardInterrupt:
        print("vqad: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    with warnings.catch_warnings():  # restored on return: a caller's (or a test's) own handling is untouched
        warnings.showwarning = _show_warning
        return _run(args)


def _run(args) -> int:
    from vqad.device import keep_freed_memory, set_threads  # (PyTorch: imported by build_parser already)
    from vqad.fit import interrupt_guard

    try:
        keep_freed_memory()  # no page faults for every re-allocated tensor ($VQAD_MALLOC=default: leave malloc alone)
        # (batch's --threads is each fit's: it checks them against the cores itself)
        set_threads(args.threads, warn=not getattr(args, "threads_per_fit", False))
        with interrupt_guard():  # SIGTERM stops every command as Ctrl-C does: one line, exit 143
            return int(args.func(args) or 0)
    except VqadError as exc:
        print(f"vqad: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if isinstance(exc, Terminated):
            print("vqad: terminated (SIGTERM)", file=sys.stderr)
            return 143
        print("vqad: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not stdout_reader_gone():
            raise  # another pipe broke: not stdout's reader going away (| head)
        try:  # no traceback, and none when Python flushes stdout at exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # stdout is not a file (captured)
            pass
        print(f"vqad: {args.command} stopped: its output's reader closed (| head?); what it wrote before stays",
              file=sys.stderr)
        return 1
    except OSError as exc:  # the file system said no where no check of ours did: one line, not a traceback
        hint = _OS_HINTS.get(exc.errno)
        if hint is None or (exc.errno in _PATH_ERRNOS and not exc.filename):
            raise  # not the user's environment (or not about a path): a bug's traceback
        name = str(exc.filename) if exc.filename else ""
        where = f" {name if len(name) <= 120 else name[:60] + '...' + name[-57:]}" if name else ""
        print(f"vqad: error: cannot use{where}: {exc.strerror or exc}; {hint}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = getattr(args, "oom_hint", None) or f"see vqad {args.command} --help for the flags that size it"
        print(f"vqad: error: out of memory ({first[:200]}): the job is too large for this machine; {hint}", file=sys.stderr)
        return 2
    finally:
        from vqad.app.commands.common import release_output_dirs

        release_output_dirs()  # the --out folders a fit held (another fit may write them now)


#: file-system errors a command's paths or machine cause, with what to do (others keep their traceback)
_OS_HINTS = {
    errno.ENAMETOOLONG: "give a shorter path (a file or folder name over 255 bytes, or a path too long)",
    errno.ENOSPC: "free some disk space, or write elsewhere",
    errno.EDQUOT: "your disk quota is full: free some space, or write elsewhere",
    errno.EACCES: "check the path's permissions, or write elsewhere",
    errno.EPERM: "check the path's permissions, or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.ELOOP: "the path holds a loop of symbolic links",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
}


#: ... of which those that are the user's only when they name a path (EPERM also comes from signals, sockets, ...)
_PATH_ERRNOS = (errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ELOOP)


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (host or device), not another runtime error."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("can't allocate memory", "out of memory", "not enough memory", "cannot allocate memory"))


if __name__ == "__main__":
    sys.exit(main())
