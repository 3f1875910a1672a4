"""``vqad view SOURCE``: the interactive web viewer (:mod:`vqad.app.view`)."""

from __future__ import annotations

from vqad.app.commands.common import add_device_arg, check_image_side
from vqad.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("view", help="open an interactive web viewer of a model (refines as a .vqad streams in)")
    p.add_argument("source", help=".vqad file, checkpoint directory, or http(s):// URL of a .vqad file")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1; 0.0.0.0 for the network)")
    p.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080; 0: any free port)")
    p.add_argument("--bandwidth", default=None, metavar="RATE",
                   help="simulate a slow link, e.g. 1Mbit, 256kbit, 500kB/s (a .vqad file or URL)")
    p.add_argument("--lod", type=int, default=None, help="stop at this level of detail")
    p.add_argument("--size", type=int, default=None, help="long side of the still frame in pixels (default 512)")
    add_device_arg(p)
    p.set_defaults(func=cmd_view)


def cmd_view(args) -> int:
    from vqad.app.fetch import parse_rate
    from vqad.app.view import STILL_SIZE, open_viewer

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be 0..65535, got {args.port}")
    check_image_side(args.size, "--size")
    if args.size is not None and args.size < 16:
        raise InputError(f"--size must be 16..8192 pixels for vqad view (a still frame smaller than 16 is no picture), "
                         f"got {args.size}")
    bandwidth = parse_rate(args.bandwidth) if args.bandwidth is not None else None
    handle = open_viewer(args.source, host=args.host, port=args.port, bandwidth=bandwidth, device=args.device,
                         lod=args.lod, still_size=STILL_SIZE if args.size is None else args.size)
    print(f"vqad view: open {handle.url} in a browser (Ctrl-C to stop)", flush=True)
    try:
        handle.wait()
    finally:
        handle.stop()
    return 0
