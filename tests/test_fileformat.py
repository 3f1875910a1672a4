"""The progressive .vqad file: round trips, exactness, prefixes, damage, streaming sources, CLI."""

import http.server
import io
import json
import socket
import struct
import threading
import time
import warnings
import zlib

import numpy as np
import pytest
import torch

import vqad
from vqad import entropy as E
from vqad import fileformat as F
from vqad.checkpoint import save_checkpoint
from vqad.app.cli import main
from vqad.config import DecoderConfig, GridConfig
from vqad.errors import CorruptStreamError, InputError, StreamError, TruncatedStreamError
from vqad.sdf.field import SDFField
from vqad.grid import OctreeGrid
from vqad.octree import SparseOctree
from vqad.storages import STORAGES


# -- helpers ---------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_field(storage="codebook", bits=4, kind="sdf", levels=(2, 4), k=4, hidden=16, seed=0, n_points=200,
               surface=False, bake=True):
    """An untrained (random) field on a small octree: enough for byte-exact round trips."""
    torch.manual_seed(seed)
    if surface:  # points on a sphere: an octree shell with the structure of a real surface
        p = torch.randn(n_points, 3)
        pts = 0.7 * p / p.norm(dim=1, keepdim=True)
    else:
        pts = torch.rand(n_points, 3) * 1.6 - 0.8
    octree = SparseOctree.from_points(pts, *levels, dilate=0)
    posthoc = storage == "kmeans"  # fitted to a trained dense grid, never trained itself
    grid = OctreeGrid.from_octree(octree, GridConfig("dense" if posthoc else storage, k, bits, *levels))
    if kind == "sdf":
        field = SDFField(grid, DecoderConfig(hidden=hidden))
    else:
        from vqad.nerf.field import NeRFConfig, NeRFField

        field = NeRFField(grid, DecoderConfig(hidden=hidden), NeRFConfig(geo_features=3, color_hidden=8, sh_degree=1))
    if storage == "dense" or posthoc:  # give the dense grid features that matter to the output
        for s in field.grid.storages:
            s.Z.data.normal_(0, 0.5)
    if posthoc:
        from vqad.posthoc import posthoc as compress

        return compress(field, storage, bits=bits)
    if bake:
        field.bake(fp16=True)
    return field


def outputs(field, x, lod):
    with torch.no_grad():
        if field.kind == "nerf":
            d = torch.nn.functional.normalize(x.flip(1) + 0.3, dim=1)
            sig, rgb = field(x, d, lod)
            return torch.cat([sig[:, None], rgb], dim=1)
        return field(x, lod)


def assert_same_model(a, b, lods=None):
    """b decodes to exactly a: same octree, stored tensors, decoder weights and outputs, bit for bit."""
    lods = b.lods if lods is None else lods
    assert b.lods == [lv for lv in a.lods if lv <= max(lods)]
    x = torch.rand(3000, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for lod in lods:
        assert torch.equal(a.grid.octree.codes[lod], b.grid.octree.codes[lod])
        ta, tb = a.grid.storage(lod).export_tensors(), b.grid.storage(lod).export_tensors()
        assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta)
        oa, ob = outputs(a, x, lod), outputs(b, x, lod)
        assert oa.abs().sum() > 0  # the comparison is not vacuous
        assert torch.equal(oa, ob), f"LOD {lod}: decoded outputs differ"
    da, db = a.decoder_state(), b.decoder_state()
    assert all(torch.equal(db[n], da[n]) for n in db)


def frames(data: bytes):
    """(offset, type, level, slot, codec, length) of every chunk, parsed independently of the reader."""
    out, pos = [], F.PREAMBLE_BYTES
    while pos < len(data):
        t, lv, sl, co, n = struct.unpack_from("<BBBBI", data, pos)
        out.append((pos, t, lv, sl, co, n))
        pos += 12 + n
    assert pos == len(data)
    return out


def reframe(head: bytes, payload: bytes) -> bytes:
    head = head[:4] + struct.pack("<I", len(payload))
    return head + payload + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head)))


@pytest.fixture(scope="module")
def small():
    field = make_field(levels=(2, 3), k=2, hidden=4, n_points=40)
    return field, F.to_bytes(field)


# -- round trips and exactness ---------------------------------------------------------------------
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("storage", sorted(STORAGES))
def test_round_trip_every_storage_kind(storage, entropy):
    field = make_field(storage=storage, surface=True, n_points=400)
    data = F.to_bytes(field, entropy=entropy)
    back = F.load(data)
    assert back.baked and back.kind == "sdf"
    assert_same_model(field, back)
    assert back.normalization == field.normalization


@pytest.mark.parametrize("storage", sorted(STORAGES))
def test_every_storage_declares_the_layout_of_its_export(storage):
    """A storage's stored_layout() names its exported tensors in file order and adds up to stored_bits()."""
    field = make_field(storage=storage, bits=5, k=3)
    for s in field.grid.storages:
        layout = type(s).stored_layout(s.m, s.k, **s.params())
        exported = s.export_tensors()
        assert [lay.name for lay in layout] == list(exported)
        assert sum(lay.stored_bits() for lay in layout) == s.stored_bits()
        for lay in layout:
            assert lay.encoding in ("f16", "uint") and exported[lay.name].numel() == lay.numel


@pytest.mark.parametrize("bits", [1, 3, 8, 12])
def test_round_trip_codebook_bit_widths(bits):
    field = make_field(bits=bits, k=3, levels=(2, 3))
    for entropy in (False, True):
        assert_same_model(field, F.load(F.to_bytes(field, entropy=entropy)))


def test_round_trip_radiance_field():
    """Nothing in the format is SDF-specific: a NeRF field's decoders travel the same way."""
    field = make_field(kind="nerf", levels=(2, 3))
    back = F.load(F.to_bytes(field, entropy=True))
    assert back.kind == "nerf" and back.nerf_cfg == field.nerf_cfg
    assert_same_model(field, back)


@pytest.mark.parametrize("record", [0, [], False, "x"])
def test_a_dataset_record_of_another_type_is_damage_not_absence(record):
    """A radiance field's header whose dataset record is not an object (a fuzz pass: 0, [], false were read as
    "no record" and eval asked for --dataset) is refused as corrupt; ``null`` still means none recorded."""
    from vqad.errors import CorruptStreamError

    data = F.to_bytes(make_field(kind="nerf", levels=(2, 3)))
    off = F.PREAMBLE_BYTES
    (n,) = struct.unpack_from("<I", data, off + 4)
    doc = json.loads(data[off + 8:off + 8 + n])

    def forged(value) -> bytes:
        doc["field"]["dataset"] = value
        header = json.dumps(doc).encode()
        return data[:off] + F._frame(*data[off:off + 4], header) + data[off + 12 + n:]

    with pytest.raises(CorruptStreamError, match="the dataset record must be an object"):
        F.load(forged(record))
    assert F.load(forged(None)).dataset == {}


def test_trained_model_decodes_to_identical_outputs_and_mesh(tmp_path):
    """A (briefly) fitted SDF of a sphere: the decoded file gives the same distances, the same error
    against the true SDF and the same marching-cubes mesh, bit for bit."""
    from vqad import fit as T
    from vqad.optim import make_optimizers
    from vqad.sdf.extract import extract_mesh

    field = make_field(bits=3, k=4, surface=True, n_points=2000, levels=(2, 4), bake=False)
    field.train()
    opts = make_optimizers(field, 1e-2, 10.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        x = torch.rand(512, 3, generator=g) * 2 - 1
        truth = x.norm(dim=1) - 0.7
        T.zero_grad(opts)
        ((field.all_lods(x) - truth) ** 2).mean(dim=1).sum().backward()
        T.step(opts)
    field.bake(fp16=True)
    assert len(set(field.grid.storage(4).V.tolist())) > 1
    path = tmp_path / "m.vqad"
    assert F.save(field, path, entropy=True) == path.stat().st_size
    back = vqad.load(path)  # the public entry point dispatches to the .vqad reader
    assert_same_model(field, back)
    x = torch.rand(2000, 3, generator=torch.Generator().manual_seed(3)) * 2 - 1
    truth = x.norm(dim=1) - 0.7
    for lod in field.lods:
        with torch.no_grad():
            err_a = (field(x, lod) - truth).abs().mean()
            err_b = (back(x, lod) - truth).abs().mean()
        assert torch.equal(err_a, err_b)
    ma, mb = extract_mesh(field, 4, resolution=24), extract_mesh(back, 4, resolution=24)
    assert len(ma.faces) > 0
    assert np.array_equal(ma.vertices, mb.vertices) and np.array_equal(ma.faces, mb.faces)


def test_writer_refuses_what_it_cannot_store_exactly():
    field = make_field(bake=False)
    with pytest.raises(InputError, match="bake"):
        F.to_bytes(field)
    field.bake(fp16=False)
    with pytest.raises(InputError, match="fp16"):
        F.to_bytes(field)
    field.bake(fp16=True)  # idempotent on an already baked field, and now exact
    assert_same_model(field, F.load(F.to_bytes(field)))


# -- sizes -----------------------------------------------------------------------------------------
def test_file_size_is_formula_plus_documented_overhead():
    field = make_field(bits=4, k=5, surface=True, n_points=500, levels=(2, 5))
    data = F.to_bytes(field)
    info = F.read_info(data)
    octree, k, b = field.grid.octree, 5, 4
    assert info.total_bytes == len(data)
    overhead = F.PREAMBLE_BYTES + 12 * len(info.chunks) + info.header_bytes + info.decoder_bytes
    grid = 0
    for lv in info.levels:
        m = octree.num_vertices(lv.level)
        assert lv.vertices == m and lv.cells == octree.num_cells(lv.level)
        assert lv.formula_bytes == (m * b + 16 * k * 2**b) / 8
        assert lv.grid_bytes == -(-m * b // 8) + 2 * k * 2**b  # formula, padded to whole bytes
        assert lv.dense_fp16_bytes == 2 * m * k
        masks = sum(octree.child_masks(L).numel() for L in (range(1, 3) if lv.level == 2 else [lv.level]))
        assert lv.tree_bytes == lv.tree_raw_bytes == masks  # one byte per occupied cell of the level above
        overhead += lv.tree_bytes
        grid += lv.grid_bytes
    assert len(data) == overhead + grid
    assert info.decoder_bytes - 2 * info.decoder_params < 200  # the fp16 weights plus a short directory
    assert F.lod_prefix_sizes(data) == {lv.level: lv.prefix_bytes for lv in info.levels}
    assert F.lod_prefix_sizes(data)[5] == len(data)


def test_entropy_coding_is_lossless_and_smaller_on_skewed_indices():
    field = make_field(bits=6, k=3, surface=True, n_points=3000, levels=(2, 6))
    torch.manual_seed(0)
    for s in field.grid.storages:  # learned indices are far from uniform: a geometric-ish distribution
        s.V = torch.clamp(torch.distributions.Geometric(0.3).sample((s.m,)).long(), max=63)
    raw, ent = F.to_bytes(field), F.to_bytes(field, entropy=True)
    assert len(ent) < 0.85 * len(raw)
    codecs = {(c[1], c[4]) for c in frames(ent)}
    assert (F.ChunkType.GRID, F.Codec.RANGE) in codecs and (F.ChunkType.TREE, F.Codec.OCTREE) in codecs
    assert_same_model(field, F.load(ent))
    info = F.read_info(ent)
    assert info.raw_total_bytes == len(raw) and info.total_bytes == len(ent)


# -- prefixes --------------------------------------------------------------------------------------
def test_every_prefix_decodes_its_largest_complete_lod(small):
    field, data = small
    sizes = F.lod_prefix_sizes(data)
    assert sorted(sizes) == [2, 3] and sizes[3] == len(data)
    for n in range(len(data) + 1):
        complete = [lv for lv, need in sizes.items() if need <= n]
        if not complete:
            with pytest.raises(TruncatedStreamError, match="truncated"):
                F.load(data[:n])
            with pytest.raises(TruncatedStreamError):
                F.load(data, max_bytes=n)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error" if n == len(data) else "ignore")
            got = F.load(data[:n])
        assert got.lods == complete
        if n % 5 == 0:
            assert F.load(data, max_bytes=n).lods == complete
        if n in sizes.values():  # exactly at a LOD boundary: the same model as in memory
            assert_same_model(field, got, lods=complete)


def test_pushing_one_byte_at_a_time_completes_lods_exactly_at_their_prefix(small):
    field, data = small
    sizes = F.lod_prefix_sizes(data)
    dec = F.StreamDecoder()
    seen = {}
    for i in range(len(data)):
        for lod in dec.feed(data[i:i + 1]):
            seen[lod] = i + 1
    assert seen == sizes and dec.finished
    assert_same_model(field, dec.field())


def test_fields_of_one_decoder_share_no_memory(small):
    """Two fields of one StreamDecoder (and the decoder itself) own their octree tables and indices:
    a field edited in place (set_indices on a baked codebook, say) changes neither the other nor the
    next field the decoder gives."""
    field, data = small
    dec = F.StreamDecoder()
    dec.feed(data)
    a, b = dec.field(), dec.field()

    def ptrs(f):
        out = {}
        for lv in f.grid.octree.levels:
            for name in ("codes", "corners", "keys"):
                out[f"{name}_{lv}"] = f.grid.octree._buffers[f"{name}_{lv}"].untyped_storage().data_ptr()
        for i, s in enumerate(f.grid.storages):
            out[f"V_{i}"] = s.V.untyped_storage().data_ptr()
        return out

    pa, pb = ptrs(a), ptrs(b)
    held = {t.untyped_storage().data_ptr() for lv in dec._levels.values() for t in (lv.codes, lv.corners, lv.keys)}
    assert not set(pa.values()) & set(pb.values()) and not (set(pa.values()) | set(pb.values())) & held
    first = a.grid.storages[-1]
    first.set_indices(torch.arange(3), (first.V[:3] + 1) % (1 << first.b))
    assert not torch.equal(first.V, b.grid.storages[-1].V)
    assert_same_model(field, dec.field())


def test_the_header_shell_becomes_the_first_full_field_once(small):
    """The modules built on the meta device to check the header become the first field of every LOD
    (made real, every decoder tensor loaded from the file); later fields, and fields of fewer LODs, are
    built afresh; all decode to the same model, and their decoder weights share no memory."""
    field, data = small
    dec = F.StreamDecoder()
    dec.feed(data)
    shell = dec._shell
    assert shell is not None and all(p.is_meta for p in shell.decoder_state().values())
    coarse = dec.field(field.lods[-2])
    assert dec._shell is shell  # a field of fewer LODs has fewer per-LOD decoders: built afresh
    a = dec.field()
    assert a is shell and dec._shell is None and not any(t.is_meta for t in a.state_dict().values())
    b = dec.field()
    assert b is not a
    assert_same_model(field, a) and assert_same_model(field, b)
    assert_same_model(field, coarse, lods=field.lods[:-1])
    pa = {t.untyped_storage().data_ptr() for t in a.decoder_state().values()}
    pb = {t.untyped_storage().data_ptr() for t in b.decoder_state().values()}
    assert not pa & pb


def test_a_shell_with_a_tensor_the_file_does_not_hold_is_not_used(small):
    """A buffer outside the grid that the state dict leaves out would stay uninitialised: build afresh."""
    field, data = small
    dec = F.StreamDecoder()
    dec.feed(data)
    dec._shell.decoders()[0].register_buffer("scratch", torch.empty(3, device="meta"), persistent=False)
    assert F._fill_shell(dec._shell, dec.field().grid, dec._decoder, torch.device("cpu")) is None
    dec2 = F.StreamDecoder()
    dec2.feed(data)
    dec2._shell.decoders()[0].register_buffer("scratch", torch.empty(3, device="meta"), persistent=False)
    got = dec2.field()
    assert not hasattr(got.decoders()[0], "scratch")  # the fresh build, not the shell
    assert_same_model(field, got)


def test_truncation_messages_and_warning(small):
    field, data = small
    with pytest.raises(TruncatedStreamError, match="empty"):
        F.load(data[:0])
    for n in (5, 12, 30):
        with pytest.raises(TruncatedStreamError, match=f"after {n} bytes") as e:
            F.load(data[:n])
        assert "--bytes" in str(e.value)
    with pytest.warns(UserWarning, match="ended after"):
        got = F.load(data[:-1])  # an accidentally truncated file: its largest complete LOD, loudly
    assert got.lods == [2]


def test_lod_argument(small):
    field, data = small
    assert F.load(data, lod=2).lods == [2]
    assert F.load(data, lod=3).lods == [2, 3]
    with pytest.raises(InputError, match="finest LOD 3"):  # was the whole file, silently
        F.load(data, lod=9)
    with pytest.raises(InputError, match="coarsest LOD 2"):
        F.load(data, lod=1)
    stream = io.BytesIO(data)  # stops reading once the LOD is complete
    sizes = F.lod_prefix_sizes(data)
    list(F.iter_lods(stream, lod=2, block=16))
    assert sizes[2] <= stream.tell() < sizes[2] + 16


# -- damage ----------------------------------------------------------------------------------------
def test_every_flipped_payload_or_crc_byte_is_caught_and_named(small):
    _, data = small
    info = F.read_info(data)
    assert len(info.chunks) == len(frames(data))
    for rec in info.chunks:
        for pos in (rec.offset + 8, rec.offset + 8 + rec.length // 2, rec.end - 1):  # payload ... CRC
            bad = bytearray(data)
            bad[pos] ^= 0x10
            with pytest.raises(CorruptStreamError, match=f"CRC mismatch in chunk '{rec.name}'"):
                F.load(bytes(bad))


def test_flipped_frame_headers_are_caught(small):
    """A damaged frame header is an error, except a length that now runs past the end of the file:
    that reads as a truncated file, which decodes its complete LODs and says so with a warning."""
    _, data = small
    for off, *_ in frames(data):
        for i in range(8):
            bad = bytearray(data)
            bad[off + i] ^= 0x01
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                try:
                    F.load(bytes(bad))
                except StreamError:
                    continue
            assert i >= 4 and any("ended after" in str(x.message) for x in w), (off, i)


def test_bad_magic_version_reserved_and_trailing(small):
    _, data = small
    with pytest.raises(CorruptStreamError, match="not a .vqad file"):
        F.load(b"PK\x03\x04" + data[4:])
    with pytest.raises(CorruptStreamError, match="not a .vqad file"):
        F.load(b"{\"")  # caught from the first bytes, not after waiting for more
    with pytest.raises(CorruptStreamError, match="unsupported .vqad version 2"):
        F.load(data[:8] + struct.pack("<H", 2) + data[10:])
    with pytest.raises(CorruptStreamError, match="reserved"):
        F.load(data[:10] + b"\x01\x00" + data[12:])
    with pytest.raises(CorruptStreamError, match="trailing"):
        F.load(data + b"\x00")
    with pytest.raises(CorruptStreamError, match="trailing"):
        F.load(data + data)


def test_impossible_sizes_fail_fast_without_allocating(small):
    _, data = small
    fr = frames(data)
    preamble = data[:12]
    huge = struct.pack("<BBBBI", 1, 0, 0, 0, 0xFFFFFFFF)
    t0 = time.perf_counter()
    with pytest.raises(CorruptStreamError, match="declares 4,294,967,295 payload bytes"):
        F.load(preamble + huge)  # judged from the 8-byte frame header alone
    # a chunk that claims more than its level can hold (its raw size), before its bytes arrive
    for off, t, lv, sl, co, n in fr:
        if t in (F.ChunkType.TREE, F.ChunkType.GRID) and off > fr[2][0]:
            bad = data[:off] + struct.pack("<BBBBI", t, lv, sl, co, n + 100_000) + data[off + 8:]
            with pytest.raises(CorruptStreamError, match="more than the"):
                F.load(bad)
    # a (CRC-valid) header that asks for a gigantic decoder: refused from the header, nothing allocated
    off, t, lv, sl, co, n = fr[0]
    doc = json.loads(data[off + 8:off + 8 + n])
    doc["field"]["decoder"]["hidden"] = 10**9
    forged = preamble + reframe(data[off:off + 8], json.dumps(doc).encode()) + data[fr[1][0]:]
    with pytest.raises(CorruptStreamError, match=r"decoder width\) must be an integer in 1..4096"):
        F.load(forged)
    # a wider decoder within bounds: the decoder chunk that follows disagrees
    doc["field"]["decoder"]["hidden"] = 4096
    forged = preamble + reframe(data[off:off + 8], json.dumps(doc).encode()) + data[fr[1][0]:]
    with pytest.raises(CorruptStreamError, match="decoder chunk does not match"):
        F.load(forged)
    assert time.perf_counter() - t0 < 10


def test_chunks_out_of_order_or_unknown(small):
    _, data = small
    fr = frames(data)
    head, deco = fr[0], fr[1]
    a = data[head[0]:deco[0]]
    b = data[deco[0]:fr[2][0]]
    with pytest.raises(CorruptStreamError, match="expected 'header'"):
        F.load(data[:12] + b + a + data[fr[2][0]:])
    unknown = reframe(struct.pack("<BBBBI", 9, 0, 0, 0, 0), b"")
    with pytest.raises(CorruptStreamError, match="unknown chunk type 9"):
        F.load(data[:12] + unknown)
    bad_codec = reframe(struct.pack("<BBBBI", 1, 0, 0, 1, 0), data[head[0] + 8:head[0] + 8 + head[5]])
    with pytest.raises(CorruptStreamError, match="codec 1"):
        F.load(data[:12] + bad_codec)


def test_forged_payloads_behind_valid_crcs(small):
    """Damage that a CRC cannot see (a buggy writer): still the library's own error, naming the problem."""
    _, data = small
    fr = frames(data)

    def swap(i, payload):
        off, *_, n = fr[i]
        return data[:off] + reframe(data[off:off + 8], payload) + data[off + 12 + n:]

    with pytest.raises(CorruptStreamError, match="not valid JSON"):
        F.load(swap(0, b"{nope"))
    with pytest.raises(CorruptStreamError, match="cannot build"):
        F.load(swap(0, json.dumps({"field": {"kind": "teapot"}}).encode()))
    tree = next(i for i, f in enumerate(fr) if f[1] == F.ChunkType.TREE)
    n = fr[tree][5]
    with pytest.raises(CorruptStreamError, match="no children"):
        F.load(swap(tree, b"\x00" * n))
    with pytest.raises(CorruptStreamError, match="too short"):
        F.load(swap(tree, b"\x01"))
    v = next(i for i, f in enumerate(fr) if f[1] == F.ChunkType.GRID and f[3] == 1)
    with pytest.raises(CorruptStreamError, match="needs"):
        F.load(swap(v, data[fr[v][0] + 8:fr[v][0] + 8 + fr[v][5] - 1]))


# -- streaming sources -----------------------------------------------------------------------------
def test_iter_lods_from_a_socket(small):
    field, data = small
    sizes = F.lod_prefix_sizes(data)
    a, b = socket.socketpair()

    def send():
        for i in range(0, len(data), 7):  # trickle the bytes in
            a.sendall(data[i:i + 7])
        a.close()

    t = threading.Thread(target=send)
    t.start()
    with b.makefile("rb") as stream:
        got = [(s.lod, s.nbytes, s.field) for s in F.iter_lods(stream, block=5)]
    t.join()
    b.close()
    assert [(lod, n) for lod, n, _ in got] == sorted(sizes.items())
    assert_same_model(field, got[-1][2])


def test_iter_lods_from_an_http_response(small):
    import urllib.request

    field, data = small

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.handle_request)
    t.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/m.vqad", timeout=10) as r:
            lods = [s.lod for s in F.iter_lods(r)]
    finally:
        t.join()
        server.server_close()
    assert lods == [2, 3]


def test_iter_lods_over_http_yields_a_lod_before_the_rest_has_arrived(small):
    """iter_lods read an HTTP response in 64 kB blocks, and HTTPResponse.read waits for a whole block: a file
    under 64 kB decoded nothing until the download ended (found following serving.md as a new user). The server
    here sends the first LOD's bytes, then waits until the reader has that LOD before it sends the rest."""
    import urllib.request

    field, data = small
    first = F.lod_prefix_sizes(data)[2]
    assert len(data) < F.READ_BLOCK
    got_first = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:first])
            self.wfile.flush()
            got_first.wait(timeout=20)
            self.wfile.write(data[first:])

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.handle_request)
    t.start()
    lods, t0 = [], time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/m.vqad", timeout=30) as r:
            for s in F.iter_lods(r):
                lods.append((s.lod, round(time.monotonic() - t0)))
                got_first.set()
    finally:
        got_first.set()
        t.join()
        server.server_close()
    assert [lod for lod, _ in lods] == [2, 3] and lods[0][1] < 10  # LOD 2 while the server held the rest back (20 s)


def test_iter_lods_warns_of_a_cut_stream_and_yields_what_came_before_damage(small):
    """A stream cut after its first LOD yields that LOD and warns (as load does: a dropped connection is no end
    of file); damage after complete LODs yields them before the error, however the bytes are split."""
    field, data = small
    sizes = F.lod_prefix_sizes(data)
    cut = data[: sizes[2] + 10]
    with pytest.warns(UserWarning, match="ended after .* using LOD 2 of 2..3"):
        assert [s.lod for s in F.iter_lods(cut)] == [2]
    import vqad

    for load in (vqad.load, F.load, lambda c: list(F.iter_lods(c))):  # the warning names the caller's line
        with pytest.warns(UserWarning, match="ended after") as w:
            load(cut)
        assert w[0].filename == __file__, w[0].filename  # (it named vqad/api.py for vqad.load)
    for block in (len(data) + 4, 1000, 7):
        got = []
        with pytest.raises(CorruptStreamError):
            for s in F.iter_lods(data + b"junk", block=block):
                got.append(s.lod)
        assert got == [2, 3], block


def test_other_sources(small, tmp_path):
    field, data = small
    path = tmp_path / "m.vqad"
    path.write_bytes(data)
    pieces = [data[i:i + 3] for i in range(0, len(data), 3)]
    for src in (path, str(path), data, bytearray(data), memoryview(data), io.BytesIO(data), iter(pieces)):
        assert_same_model(field, vqad.load(src))
    assert vqad.load(path, max_bytes=F.lod_prefix_sizes(data)[2]).lods == [2]
    with pytest.raises(InputError, match="cannot read a .vqad stream"):
        F.load(12345)
    with pytest.raises(InputError, match="max_bytes"):
        F.load(data, max_bytes=-1)


def test_push_decoder_with_random_pieces(small):
    field, data = small
    rng = np.random.default_rng(0)
    dec, done, pos = F.StreamDecoder(), [], 0
    while pos < len(data):
        n = int(rng.integers(1, 50))
        done += dec.feed(data[pos:pos + n])
        pos += n
    assert done == [2, 3]
    assert dec.field(2).lods == [2]
    with pytest.raises(CorruptStreamError, match="trailing"):
        dec.feed(b"x")
    with pytest.raises(CorruptStreamError, match="trailing"):  # and it stays failed
        dec.feed(b"")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_decode_is_exact_on_the_gpu():
    """Written from a GPU field, decoded onto the GPU: every tensor there, outputs bit for bit."""
    dev = torch.device("cuda")
    field = make_field(surface=True, n_points=2000, levels=(2, 5), bake=False)
    field.grid.octree = field.grid.octree.to(dev)
    field = field.to(dev)
    field.bake(fp16=True)
    x = torch.rand(20000, 3, device=dev) * 2 - 1
    for entropy in (False, True):
        back = F.load(F.to_bytes(field, entropy=entropy), device=dev)
        assert back.grid.octree.device.type == "cuda"
        assert all(t.device.type == "cuda" for t in back.state_dict().values())
        with torch.no_grad():
            assert all(torch.equal(field(x, lod), back(x, lod)) for lod in field.lods)


# -- entropy coder ---------------------------------------------------------------------------------
def test_quantized_frequencies():
    rng = np.random.default_rng(0)
    for a in (2, 16, 256, 4096):
        counts = rng.integers(0, 5, size=a) * (rng.random(a) < 0.5)
        counts[0] += 10**6  # one dominant symbol and many rare ones
        f = E.quantize_counts(counts)
        assert f.sum() == 1 << E.FREQ_PRECISION
        assert ((f > 0) == (counts > 0)).all()


def test_range_coder_round_trip_and_bomb_guard():
    rng = np.random.default_rng(1)
    s = np.minimum(rng.geometric(0.4, size=5000) - 1, 15)
    payload = E.encode(s, 16)
    assert np.array_equal(E.decode(payload, len(s), 16), s)
    assert len(payload) < 5000 * 4 / 8 * 0.8  # skewed symbols cost well under 4 bits
    one = E.encode(np.zeros(100, dtype=np.int64), 16)  # a single symbol: near-zero bits per symbol
    with pytest.raises(E.EntropyError, match="per byte"):
        E.decode(one, 10**9, 16)


@pytest.mark.parametrize("fused", [True, False])  # the C kernel (where built), or NumPy's two lookups
def test_octree_contexts_both_lookups_agree_and_masks_round_trip(monkeypatch, fused):
    from vqad import kernels

    if fused and not kernels.applies(torch.zeros(1)):
        pytest.skip(f"vqad's C kernels are not built here: {kernels.status()}")
    if not fused:
        monkeypatch.setattr(kernels, "_forced_off", 1)
    torch.manual_seed(0)
    octree = SparseOctree.from_points(0.8 * torch.nn.functional.normalize(torch.randn(20000, 3), dim=1), 2, 6, dilate=0)
    parts = []
    for level in range(3, 7):
        codes = octree.codes[level - 1].numpy()
        c_dense = E.octree_contexts(codes, level - 1)
        c_sparse = E.octree_contexts(codes, level - 1, dense_max_res=0)
        assert np.array_equal(c_dense, c_sparse)
        parts.append((codes, level - 1, octree.child_masks(level).numpy()))
    # brute force for one cell: context bit t-1 = occupancy of P + (t>>2&1·d_x, t>>1&1·d_y, t&1·d_z)
    from vqad.octree import morton_decode

    for level, rows in ((3, None), (5, (0, len(octree.codes[5]) // 2, len(octree.codes[5]) - 1))):
        codes = octree.codes[level]
        ijk = {tuple(v) for v in morton_decode(codes).tolist()}
        ctx = E.octree_contexts(codes.numpy(), level)
        assert ctx.shape == (len(codes), 8) and ctx.dtype == np.uint8
        for i in range(len(codes)) if rows is None else rows:  # level 3: every cell
            p = morton_decode(codes[i:i + 1])[0].tolist()
            for c in range(8):
                d = [2 * ((c >> 2) & 1) - 1, 2 * ((c >> 1) & 1) - 1, 2 * (c & 1) - 1]
                want = sum(1 << (t - 1) for t in range(1, 8)
                           if (p[0] + ((t >> 2) & 1) * d[0], p[1] + ((t >> 1) & 1) * d[1], p[2] + (t & 1) * d[2]) in ijk)
                assert ctx[i, c] == want
    payload = E.encode_octree(parts)
    dec = E.OctreeDecoder(payload)
    for codes, plevel, masks in parts:
        assert np.array_equal(dec.decode_level(codes, plevel), masks)
    assert len(payload) < 0.7 * sum(len(p[2]) for p in parts)  # a surface shell codes well below 8 bits/cell


def correlated_field(bits=(4, 4, 4, 4, 4), keep=0.7, seed=0):
    """A field whose index V_L copies V_{L-1} at the coarser vertex with probability ``keep`` (else uniform)."""
    field = make_field(bits=4, k=3, surface=True, n_points=3000, levels=(2, 6), bake=True)
    g = torch.Generator().manual_seed(seed)
    octree = field.grid.octree
    storages = []
    for i, (L, b) in enumerate(zip(octree.levels, bits)):
        m = octree.num_vertices(L)
        V = torch.randint(0, 1 << b, (m,), generator=g)
        if i:
            up = storages[-1].V[octree.coarser_vertices(L)] % (1 << b)
            V = torch.where(torch.rand(m, generator=g) < keep, up, V)
        D = torch.randn(1 << b, 3, generator=g).half().float()
        storages.append(STORAGES["codebook"].from_indices(D, V))
    field.grid.storages = torch.nn.ModuleList(storages)
    return field


def test_coarser_vertices_brute_force():
    octree = make_field(surface=True, n_points=2000, levels=(2, 5)).grid.octree
    for L in (3, 4, 5):
        up = octree.coarser_vertices(L)
        fine, coarse = octree.vertices[L], octree.vertices[L - 1]
        assert torch.equal(coarse[up], fine // 2)  # floor(v / 2), always present at level L - 1
    with pytest.raises(ValueError):
        octree.coarser_vertices(2)


def test_context_coder_round_trip_model_bytes_and_bomb_guard():
    rng = np.random.default_rng(0)
    n = 20000
    c = rng.integers(0, 16, n)
    s = np.where(rng.random(n) < 0.6, c, rng.integers(0, 16, n))
    payload = E.encode_context(s, c, 16, 16)
    assert np.array_equal(E.decode_context(payload, c, 16, 16), s)
    assert len(payload) < 0.75 * len(E.encode(s, 16))  # the context carries ~1.1 of the 4 bits
    assert 0 < E.model_bytes(payload, "context", 16, 16) < 400
    # no correlation: the shared table alone, within a few bytes of order-0
    s2 = rng.integers(0, 64, n)
    c2 = rng.integers(0, 64, n)
    p2 = E.encode_context(s2, c2, 64, 64)
    assert np.array_equal(E.decode_context(p2, c2, 64, 64), s2)
    assert len(p2) <= len(E.encode(s2, 64)) + 8
    one = E.encode_context(np.zeros(100, dtype=np.int64), np.zeros(100, dtype=np.int64), 16, 16)
    with pytest.raises(E.EntropyError, match="per byte"):
        E.decode_context(one, np.zeros(10**6, dtype=np.int64), 16, 16)
    with pytest.raises(E.EntropyError, match="cells"):
        E.decode_context(one, np.zeros(10, dtype=np.int64), 4096, 4096)


@pytest.mark.parametrize("bits", [(4, 4, 4, 4, 4), (2, 4, 6, 6, 8)])
def test_context_coded_indices_decode_bit_exactly_at_every_lod_prefix(bits):
    field = correlated_field(bits)
    raw, data = F.to_bytes(field), F.to_bytes(field, entropy=True)
    codecs = {(c.level, c.name.split()[-1]): c.codec for c in F.read_info(data).chunks if c.type == F.ChunkType.GRID}
    assert codecs[(2, "V")] != F.Codec.CONTEXT  # the base level has no coarser level
    assert all(codecs[(L, "V")] == F.Codec.CONTEXT for L in (4, 5, 6))
    assert len(data) < 0.85 * len(raw)
    for c in F.read_info(data).chunks:  # the accounting vqad info prints
        if c.type == F.ChunkType.GRID and c.name.endswith(" V"):
            assert c.symbols == field.grid.storage(c.level).m and c.bits == bits[c.level - 2]
            assert (c.model_length is None) == (c.codec == F.Codec.RAW)
            assert c.model_length is None or 0 < c.model_length < c.length
        else:
            assert c.symbols is None and c.model_length is None
    sizes = F.lod_prefix_sizes(data)
    for lod, n in sizes.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = F.load(data[:n])
        assert_same_model(field, got, lods=list(range(2, lod + 1)))
    dec = F.StreamDecoder()  # pushed in pieces: each LOD as its last chunk arrives
    for i in range(0, len(data), 97):
        for lod in dec.feed(data[i:i + 97]):
            assert_same_model(field, dec.field(lod), lods=list(range(2, lod + 1)))


def test_entropy_decoding_is_the_same_with_and_without_the_kernels(monkeypatch):
    """The C range decoder (vqad.kernels.RangeDecoder) and constriction's decode the same payloads to the
    same symbols: order-0, context-coded (2..12-bit alphabets) and octree chunks, and a whole file."""
    from vqad import kernels

    if not kernels.applies(torch.zeros(1)):
        pytest.skip(f"vqad's C kernels are not built here: {kernels.status()}")
    rng = np.random.default_rng(4)
    cases = []
    for A, K in ((2, 2), (16, 16), (64, 16), (4096, 8)):
        c = rng.integers(0, K, 6000)
        s = np.where(rng.random(6000) < 0.5, c % A, rng.integers(0, A, 6000))
        cases.append((E.decode, (E.encode(s, A), s.size, A)))
        cases.append((E.decode_context, (E.encode_context(s, c, A, K), c, A, K)))
    field = correlated_field((2, 4, 6, 6, 8))
    data = F.to_bytes(field, entropy=True)
    assert any(c.codec == F.Codec.CONTEXT for c in F.read_info(data).chunks)
    fused = [fn(*args) for fn, args in cases]
    fused_field = F.load(data)
    monkeypatch.setattr(kernels, "_forced_off", 1)
    for (fn, args), got in zip(cases, fused):
        assert np.array_equal(fn(*args), got)
    assert_same_model(F.load(data), fused_field, lods=list(range(2, 7)))
    assert_same_model(field, fused_field, lods=list(range(2, 7)))


@pytest.mark.parametrize("skew", [0.08, 0.3])  # ~1.3 % and ~13 % smaller coded
def test_an_index_chunk_is_coded_only_when_that_saves_enough(skew):
    """Near-uniform indices (coding saves < MIN_CODED_SAVING) stay RAW, so their decoding costs an unpack,
    not a range decode; skewed ones are coded. Either way the file decodes to the same indices."""
    from vqad.storages.base import TensorLayout

    rng = np.random.default_rng(3)
    n = 50_000
    v = np.where(rng.random(n) < skew, 0, rng.integers(0, 16, n))
    lay = TensorLayout("V", (n,), "uint", 4)
    codec, payload = F._encode_tensor(torch.from_numpy(v), lay, entropy=True)
    raw = F._raw_size(lay)
    coded = len(E.encode(v, 16))
    if skew < 0.1:
        assert coded > (1 - F.MIN_CODED_SAVING) * raw and coded < raw  # smaller, but not by enough
        assert codec == F.Codec.RAW and len(payload) == raw
    else:
        assert codec == F.Codec.RANGE and len(payload) <= (1 - F.MIN_CODED_SAVING) * raw
        assert np.array_equal(E.decode(payload, n, 16), v)


def test_context_codec_is_refused_where_it_cannot_apply():
    field = correlated_field()
    data = bytearray(F.to_bytes(field, entropy=True))
    fr = frames(bytes(data))
    for off, t, lv, sl, co, n in fr:
        if t == F.ChunkType.GRID and lv == 2 and sl == 1:  # base level V: no coarser level to give contexts
            head = bytes(data[off:off + 8])
            forged = reframe(head[:3] + bytes([F.Codec.CONTEXT]) + head[4:], bytes(data[off + 8:off + 8 + n]))
            bad = bytes(data[:off]) + forged + bytes(data[off + 12 + n:])
            with pytest.raises(CorruptStreamError, match="context-coded"):
                F.load(bad)


# -- CLI -------------------------------------------------------------------------------------------
def test_cli_export_and_info(tmp_path, capsys):
    field = make_field(surface=True, n_points=300, bake=False)
    save_checkpoint(tmp_path / "ckpt", field)
    out = tmp_path / "m.vqad"
    assert main(["export", str(tmp_path / "ckpt"), "-o", str(out), "--entropy"]) == 0
    text = capsys.readouterr().out
    assert "LOD 2 after" in text and "entropy coding" in text
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    for needle in ("octree L2", "grid L4 V", "dense/formula", "overhead", "framing", "index chunks", "coded b/idx",
                   "model B", "all indices"):
        assert needle in text
    field.bake(fp16=True)
    assert_same_model(field, vqad.load(out))
    bad = bytearray(out.read_bytes())
    bad[len(bad) // 2] ^= 0xFF
    (tmp_path / "bad.vqad").write_bytes(bytes(bad))
    assert main(["info", str(tmp_path / "bad.vqad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "CRC mismatch" in err and "\n" not in err
    assert main(["info", str(tmp_path / "ckpt")]) == 2
    assert main(["export", str(tmp_path / "nope"), "-o", str(tmp_path / "x.vqad")]) == 2


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def test_info_accounts_for_every_byte_of_a_cut_file(tmp_path, capsys):
    """Cut after any chunk (past the first LOD), ``vqad info``'s breakdown adds up to the bytes of the
    complete chunks: the octree and grid chunks past the last complete LOD are counted and named."""
    import re

    field = make_field(surface=True, n_points=300)
    data = F.to_bytes(field)
    ends = [c.end for c in F.read_info(data).chunks]
    first_lod = min(F.lod_prefix_sizes(data).values())
    cut = tmp_path / "cut.vqad"
    for end in [e for e in ends if e >= first_lod]:
        cut.write_bytes(data[:end + 5])  # a few bytes of the next chunk too
        assert main(["info", str(cut)]) == 0
        text = capsys.readouterr().out
        m = re.search(r"(?:file|complete chunks) ([\d,]+) B = grid ([\d,]+) \+ decoder weights ([\d,]+) \(fp16\) "
                      r"\+ overhead ([\d,]+) \([\d.]+%\)(?: \+ grid chunks past LOD \d+ ([\d,]+))?:\n"
                      r"  octree structure ([\d,]+).*?, header JSON ([\d,]+), decoder directory ([\d,]+), "
                      r"framing ([\d,]+) ", text)
        assert m, text
        total, grid, dec, other, past, tree, head, directory, framing = (_number(g or "0") for g in m.groups())
        assert total == end and total == grid + dec + other + past, text
        assert other == tree + head + directory + framing, text
