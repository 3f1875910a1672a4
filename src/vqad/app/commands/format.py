"""``vqad export`` (checkpoint → progressive .vqad file) and ``vqad info`` (what a .vqad file holds)."""

from __future__ import annotations

import shlex
from pathlib import Path

from vqad.errors import CorruptStreamError, InputError
from vqad.app.commands.common import path_arg, ensure_writable_file, refuse_output_in_model


def register(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a progressive .vqad file")
    p.add_argument("model", help="checkpoint directory (or a .vqad file to re-encode)")
    p.add_argument("-o", "--out", type=path_arg, required=True, help="output .vqad file")
    p.add_argument("--entropy", action="store_true",
                   help="range-code indices and octree masks where that is smaller (lossless)")
    p.add_argument("--recode", action="store_true",
                   help="give the indices no render reaches their level's most common codeword first: the same "
                        "renders at every LOD and prefix, a smaller entropy-coded file (needs --entropy; radiance "
                        "fields with a codebook grid; fit-nerf does it after training unless --no-recode; "
                        "docs/method.md §8.2)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="chunks, bytes per LOD and compression ratios of a .vqad file")
    p.add_argument("model", help=".vqad file")
    p.set_defaults(func=cmd_info)


def cmd_export(args) -> int:
    from vqad.api import load
    from vqad.fileformat import iter_chunks, lod_prefix_sizes, save

    if args.recode and not args.entropy:
        raise InputError("--recode makes the entropy-coded file smaller (a raw file packs every index at b bits "
                         "whichever codeword it holds): add --entropy")
    out = ensure_writable_file(args.out, (".vqad",), "--out")
    refuse_output_in_model(args.model, out)
    model = Path(args.model).resolve()
    field = load(args.model, device="cpu", whole=True)  # (a cut file re-encoded would look complete)
    if model.is_dir():
        _warn_unfinished(args.model)
    # what is evaluated is what is stored: round codebooks and decoder to fp16 now (idempotent when
    # the checkpoint was baked that way already)
    field.bake(fp16=True)
    if args.recode:
        from vqad.nerf import recode

        if not recode.applies(field):
            raise InputError(f"--recode applies to radiance fields with a codebook grid; {args.model} holds a "
                             f"{field.kind} field with a {field.grid_cfg.storage} grid")
        print(recode.recode_unreachable(field).summary())
    nbytes = save(field, out, entropy=args.entropy)
    sizes = lod_prefix_sizes(out)
    print(f"wrote {out}: {nbytes:,} bytes, {field.kind} field, LODs {min(sizes)}..{max(sizes)}")
    print("  " + ", ".join(f"LOD {lod} after {_kb(n)}" for lod, n in sizes.items()))
    if args.entropy:
        raw = sum(len(c) for c in iter_chunks(field, entropy=False))
        print(f"  entropy coding: {raw:,} -> {nbytes:,} bytes ({100 * (raw - nbytes) / raw:.1f}% smaller, lossless)")
    return 0


def _warn_unfinished(path) -> None:
    """Warn when the checkpoint is of a fit that did not finish: interrupted before its last step (a time cap
    that stopped it is a finish), or in its index sweeps (``--resume`` finishes either)."""
    import warnings

    from vqad.checkpoint import read_config

    cfg = read_config(path)
    train = cfg.get("train")
    step, asked = cfg.get("step"), train.get("steps") if isinstance(train, dict) else None
    if cfg.get("after_training") == "pending":
        warnings.warn(f"{path} is a fit stopped in its work after training (index sweeps): the file holds its "
                      "indices before them; `--resume` the fit first for the finished model", stacklevel=2)
    elif isinstance(step, int) and isinstance(asked, int) and 0 < step < asked and not cfg.get("time_capped"):
        warnings.warn(f"{path} is a fit interrupted at step {step:,} of the {asked:,} it asked: the file holds that "
                      "model; `--resume` the fit first to finish it", stacklevel=2)


_SYMBOLS = {"bits": "b", "rank": "r", "table_bits": "T"}  # storage params by the paper's symbols


def _kb(n: float) -> str:
    return f"{n / 1e3:,.1f} kB"


def cmd_info(args) -> int:
    from vqad.fileformat import read_info

    if "://" in str(args.model):  # (Path would fold the URL's // into one)
        raise InputError(f"vqad info reads local .vqad files, not URLs: download {args.model} first (vqad view "
                         "streams a URL)")
    path = Path(args.model)
    if path.is_dir():
        ckpt = (path / "config.json").is_file()
        fit = not ckpt and (path / "checkpoint" / "config.json").is_file()
        what = "a checkpoint folder" if ckpt else "a fit's folder" if fit else "a folder"
        raise InputError(f"{path} is {what}: vqad info reads .vqad files"
                         + (f" (vqad export {shlex.quote(str(path / 'checkpoint' if fit else path))} -o model.vqad writes one)"
                            if ckpt or fit else ""))
    info = read_info(path)
    for line in info_lines(info):
        print(line)
    if info.damage:  # the intact LODs are listed above; the file is still broken
        raise CorruptStreamError(info.damage)
    return 0


def info_lines(info) -> list[str]:
    """The report of ``vqad info`` as lines of text (also used by the format benchmark)."""
    from vqad.fileformat import FRAME_BYTES, PREAMBLE_BYTES, ChunkType, Codec

    cfg = info.config
    g = cfg["grid"]
    lines = [
        f"{cfg['kind']} field, storage {g['storage']}, k={g['features']}"
        + "".join(f", {_SYMBOLS.get(name, name)}={v}" for name, v in (cfg["storage_params"] or [{}])[0].items())
        + f", levels {g['base_level']}..{g['max_level']}, {info.total_bytes:,} bytes"
        + ("" if info.complete else f" (DAMAGED: LODs up to {info.levels[-1].level} are intact, the chunk after them is "
           "not; see below)" if info.damage else f" (INCOMPLETE: only LODs up to {info.levels[-1].level}"
           + (f"; the stream's {info.received_bytes:,} bytes end {info.cut}" if info.received_bytes else "") + ")"),
    ]
    if cfg["kind"] == "tsdf":  # validated when the header was read
        t = cfg["tsdf"]
        lines.append(f"TSDF: truncation {t['truncation']:g} {t['units']}, fused voxel {t['voxel']:g} {t['units']}, "
                     f"{'with' if t['color'] else 'no'} colour")
    lines += [
        "",
        f"{'offset':>9}  {'chunk':<18} {'codec':<7} {'bytes':>9} {'raw bytes':>10}",
        f"{0:>9,}  {'preamble':<18} {'':<7} {PREAMBLE_BYTES:>9,} {'':>10}",
    ]
    for c in info.chunks:
        raw = "" if c.codec == Codec.RAW else f"{c.raw_length + FRAME_BYTES:,}"
        lines.append(f"{c.offset:>9,}  {c.name:<18} {Codec(c.codec).name.lower():<7} {c.size:>9,} {raw:>10}")
    coded = [c for c in info.chunks if c.symbols]
    if coded:
        lines += [
            "",
            "index chunks (b = bits per index before coding; coded = payload bits per index, model included; "
            "model = the stored probability model):",
            f"{'chunk':<18} {'codec':<7} {'indices':>9} {'b':>3} {'bytes':>9} {'model B':>8} {'coded b/idx':>12} "
            f"{'data b/idx':>11}",
        ]
        for c in coded:
            model = c.model_length or 0
            lines.append(f"{c.name:<18} {Codec(c.codec).name.lower():<7} {c.symbols:>9,} {c.bits:>3} {c.length:>9,} "
                         f"{model:>8,} {8 * c.length / c.symbols:>12.3f} {8 * (c.length - model) / c.symbols:>11.3f}")
        n = sum(c.symbols for c in coded)
        total, models = sum(c.length for c in coded), sum(c.model_length or 0 for c in coded)
        lines.append(f"{'all indices':<18} {'':<7} {n:>9,} {sum(c.bits * c.symbols for c in coded) / n:>3.1f} "
                     f"{total:>9,} {models:>8,} {8 * total / n:>12.3f} {8 * (total - models) / n:>11.3f}")
    lines += [
        "",
        "per LOD (m = the vertices of level L; the other columns cumulative over levels base..L; grid = stored",
        "feature tensors; formula = the storage's own bits, for a codebook (m·b + 16·k·2^b)/8; dense = an fp16 grid,",
        "16·m·k/8):",
        f"{'LOD':>4} {'m':>9} {'prefix':>11} {'grid':>11} {'formula':>11} {'dense fp16':>12} {'dense/grid':>11} {'dense/formula':>14}",
    ]
    cg = cf = cd = 0.0
    for lv in info.levels:
        cg += lv.grid_bytes
        cf += lv.formula_bytes
        cd += lv.dense_fp16_bytes
        lines.append(f"{lv.level:>4} {lv.vertices:>9,} {_kb(lv.prefix_bytes):>11} {_kb(cg):>11} {_kb(cf):>11} "
                     f"{_kb(cd):>12} {cd / cg:>10.1f}x {cd / cf:>13.1f}x")
    # a cut stream's complete chunks can reach past its last complete LOD (the next level's octree, some of
    # its grid): every chunk is counted, and those are named
    top = info.levels[-1].level
    tree = sum(c.length for c in info.chunks if c.type == ChunkType.TREE)
    past = [c for c in info.chunks if c.type in (ChunkType.TREE, ChunkType.GRID) and c.level > top]
    past_tree = sum(c.length for c in past if c.type == ChunkType.TREE)
    past_grid = sum(c.length for c in past if c.type == ChunkType.GRID)
    dec = 2 * info.decoder_params
    other = info.total_bytes - cg - past_grid - dec
    lines += [
        "",
        f"{'file' if info.complete else 'complete chunks'} {info.total_bytes:,} B = grid {int(cg):,} + decoder weights "
        f"{dec:,} (fp16) + overhead {int(other):,} ({100 * other / info.total_bytes:.1f}%)"
        + (f" + grid chunks past LOD {top} {past_grid:,}" if past_grid else "") + ":",
        f"  octree structure {tree:,}" + (f" ({past_tree:,} of it past LOD {top})" if past_tree else "")
        + f", header JSON {info.header_bytes:,}, decoder directory {info.decoder_bytes - dec:,}, "
        f"framing {info.framing_bytes:,} (12-byte preamble + 12 bytes per chunk × {len(info.chunks)})",
    ]
    if info.complete:
        lines.append(f"  formula prediction (grid formula + fp16 decoder) {int(cf) + dec:,} B; "
                     f"file / formula = {info.total_bytes / (cf + dec):.3f}")
    else:
        lines.append(f"  formula prediction (grid formula + fp16 decoder) {int(cf) + dec:,} B; LOD {top}'s prefix "
                     f"{info.levels[-1].prefix_bytes:,} B / formula = {info.levels[-1].prefix_bytes / (cf + dec):.3f}")
    if info.raw_total_bytes != info.total_bytes:
        saved = info.raw_total_bytes - info.total_bytes
        lines.append(f"  entropy coding: {info.raw_total_bytes:,} B without, {info.total_bytes:,} B with "
                     f"({100 * saved / info.raw_total_bytes:.1f}% smaller)")
    return lines
