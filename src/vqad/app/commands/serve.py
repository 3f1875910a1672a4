"""``vqad serve``: the .vqad files under a folder over HTTP, with byte ranges (see vqad.app.serve)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vqad.errors import InputError, VqadError

EPILOG = """\
examples:
  vqad serve runs/                        # http://127.0.0.1:8000/ : an index of runs/**/*.vqad
  vqad serve runs/ --port 0               # a free port (the URL is printed)
  vqad serve runs/ --bandwidth 1Mbit      # throttle each response, to watch a file stream in LOD by LOD
  vqad serve runs/ --host 0.0.0.0         # reachable from other machines (no authentication!)

then, from any HTTP client:
  curl -r 0-9999 http://127.0.0.1:8000/lego.vqad -o head.vqad     # the first 10,000 bytes (206)
  curl http://127.0.0.1:8000/api/files                           # JSON: files, sizes, bytes per LOD
  vqad view http://127.0.0.1:8000/lego.vqad                      # stream it into the viewer
  open http://127.0.0.1:8000/view/lego.vqad                      # ... started by the server itself

Files are served at /<path relative to DIR>; only regular .vqad files inside DIR (symlinks
resolved), never hidden ones. Ranges, ETag / If-Range / If-None-Match and HEAD follow RFC 9110.
Ctrl-C stops the server (exit 0).
"""


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve the .vqad files under a folder over HTTP (byte ranges, listing, viewer pages)",
        description="Serve every .vqad file under DIR over HTTP, with byte ranges, so that any client can stream "
                    "it progressively: the first bytes decode to a coarse LOD.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", metavar="DIR", help="the folder whose .vqad files (and those of its subfolders) are served")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface, "
                        "so anyone who can reach this machine can download the files)")
    p.add_argument("--port", type=int, default=None, metavar="P",
                   help="TCP port (default 8000; 0 picks a free one and prints the URL)")
    p.add_argument("--bandwidth", default=None, metavar="RATE",
                   help="throttle each response to RATE, e.g. 1Mbit, 500kbit, 200kB/s, 2MB/s (default: unthrottled)")
    p.add_argument("--quiet", action="store_true", help="do not log each request")
    p.set_defaults(func=cmd_serve)


def check_dir(path: str) -> Path:
    """The folder to serve, or an InputError that says what is wrong with it."""
    root = Path(path)
    if not root.exists():
        raise InputError(f"{root} does not exist: give the folder that holds the .vqad files to serve")
    if not root.is_dir():
        hint = f" (to serve this file, give its folder: vqad serve {root.parent})" if root.suffix == ".vqad" else ""
        raise InputError(f"{root} is not a directory{hint}")
    return root


def cmd_serve(args) -> int:
    from vqad.app.rates import parse_rate
    from vqad.app.sockets import check_port

    root = check_dir(args.dir)
    try:
        from vqad.app.serve import DEFAULT_PORT, serve
    except ImportError as exc:
        raise VqadError(f"vqad serve needs starlette and uvicorn ({exc}): pip install 'vqad[view]'") from None
    bandwidth = None if args.bandwidth is None else parse_rate(args.bandwidth)
    port = DEFAULT_PORT if args.port is None else args.port
    check_port(port)  # before the folder is walked
    try:
        serve(root, host=args.host, port=port, bandwidth=bandwidth, quiet=args.quiet)
    except KeyboardInterrupt:  # Ctrl-C is how a server is stopped: a clean stop, not a failure
        print("vqad serve: stopped", file=sys.stderr)
    return 0
