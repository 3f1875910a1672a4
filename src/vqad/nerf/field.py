"""The radiance field: octree feature grid → density MLP → σ and a geometry feature → colour MLP.

For a point x in the unit cube, viewed along the unit direction d, at level of detail l::

    z      = Σ_{L_base ≤ L ≤ l} interp_L(x)                    (k features, grid.multi_lod_features)
    h      = ψ_σ([z, x?])                                      (1 + g outputs)
    σ      = act(h_0)                                           (trunc-exp or softplus)
    c      = sigmoid(ψ_c([h_1..g, SH_{deg}(d)]))                (RGB in [0, 1])

``ψ_σ`` uses the field's :class:`~vqad.config.DecoderConfig` (shared by every LOD, or one per LOD
with ``per_lod``); ``ψ_c`` follows the same sharing. σ is in units of inverse unit-cube length, so
the optical depth of a ray segment of unit-cube length δ is σ·δ.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vqad.config import MAX_HIDDEN, MAX_LAYERS, DecoderConfig, from_dict, to_dict
from vqad.decoders import LODDecoder
from vqad.errors import InputError
from vqad.field import NeuralField, Normalization
from vqad.grid import OctreeGrid
from vqad.nerf.contraction import check_outer_scale
from vqad.nerf.data import check_dataset_info

DENSITY_ACTIVATIONS = ("trunc_exp", "softplus")


#: the marching step, in finest cells: 1/32 (32 samples a cell: a billion-sample march from a typo like 1e-9 is
#: refused) to 16 (a step over 16 cells skips whole surfaces)
STEP_RATIO_RANGE = (1 / 32, 16.0)


@dataclass
class NeRFConfig:
    """Radiance-specific parts of the field (the density MLP is the :class:`DecoderConfig`)."""

    geo_features: int = 15  # g: geometry features passed from ψ_σ to ψ_c
    color_hidden: int = 64  # width of ψ_c
    color_layers: int = 1  # hidden layers of ψ_c
    sh_degree: int = 3  # view-direction encoding: real spherical harmonics of degree 0..3, (deg+1)^2 terms
    density_activation: str = "trunc_exp"  # trunc_exp | softplus
    # how the model is rendered (stored with it, so a loaded model renders as it was trained)
    step_ratio: float | None = 1.0  # ray-marching step, in finest cells (None: chosen from the octree when fitting)
    prune_alpha: float = 0.005  # a cell counts as empty where one marching step absorbs less than this
    # the scene's outer box in central-box units (vqad.nerf.contraction): 1 = the octree's cube is the
    # scene; A > 1 = the shell out to L∞ radius A is contracted into the cube's outer half
    # (None: the dataset's, when fitting)
    outer_scale: float | None = 1.0

    def validate(self) -> None:
        ints = {"geo_features": self.geo_features, "color_hidden": self.color_hidden,
                "color_layers": self.color_layers, "sh_degree": self.sh_degree}
        bad = [k for k, v in ints.items() if not isinstance(v, int) or isinstance(v, bool)]
        reals = [self.prune_alpha] + ([] if self.step_ratio is None else [self.step_ratio])
        if bad or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in reals):
            raise InputError(f"nerf config: {', '.join(bad) or 'step_ratio / prune_alpha'} must be finite numbers "
                             f"(integers for {', '.join(ints)})")
        if self.outer_scale is not None:
            check_outer_scale(self.outer_scale, "the radiance field's outer_scale")
        if not 0 <= self.sh_degree <= 3:
            raise InputError(f"sh_degree must be in 0..3, got {self.sh_degree}")
        if self.density_activation not in DENSITY_ACTIVATIONS:
            raise InputError(
                f"unknown density activation {self.density_activation!r}: choose one of {', '.join(DENSITY_ACTIVATIONS)}"
            )
        if self.step_ratio is not None and not STEP_RATIO_RANGE[0] <= self.step_ratio <= STEP_RATIO_RANGE[1]:
            raise InputError(f"step_ratio (the marching step in finest cells) must be in {STEP_RATIO_RANGE[0]:g}.."
                             f"{STEP_RATIO_RANGE[1]:g}, got {self.step_ratio:g}")
        if not 0 <= self.prune_alpha < 1:
            raise InputError("prune_alpha must be in [0, 1)")
        if not (0 <= self.geo_features <= MAX_HIDDEN and 1 <= self.color_hidden <= MAX_HIDDEN
                and 0 <= self.color_layers <= MAX_LAYERS):
            raise InputError(f"geo_features must be in 0..{MAX_HIDDEN}, color_hidden in 1..{MAX_HIDDEN} and "
                             f"color_layers in 0..{MAX_LAYERS}")


class _TruncExp(torch.autograd.Function):
    """``exp(min(x, 15))`` whose gradient is ``exp(min(x, 15))`` too, so a large raw density can neither
    overflow to ``inf`` (which turns the compositing into NaN) nor blow up a step. σ = e^15 ≈ 3·10^6
    per unit length is already opaque across a level-12 cell, so the clamp never changes a render."""

    @staticmethod
    def forward(ctx, x):  # noqa: D401
        ctx.save_for_backward(x)
        return torch.exp(x.clamp(max=15.0))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    """Density activation of instant-ngp: ``σ = exp(x)`` with a clamped backward pass."""
    return _TruncExp.apply(x)


def density_activation(raw: torch.Tensor, kind: str) -> torch.Tensor:
    """``(N,) -> (N,)`` non-negative densities. ``softplus`` is shifted by −1 so a zero input is thin."""
    if kind == "trunc_exp":
        return trunc_exp(raw)
    return F.softplus(raw - 1.0)


# real spherical-harmonics constants (the standard "Sloan" normalisation)
_C0 = 0.28209479177387814
_C1 = 0.4886025119029199
_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_C3 = (
    -0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
    -0.4570457994644658, 1.445305721320277, -0.5900435899266435,
)


def sh_encode(d: torch.Tensor, degree: int) -> torch.Tensor:
    """Real spherical harmonics ``Y_l^m(d)`` for ``l = 0..degree``: ``(N, 3) unit -> (N, (degree+1)^2)``.

    >>> sh_encode(torch.tensor([[0.0, 0.0, 1.0]]), 1)
    tensor([[0.2821, -0.0000, 0.4886, -0.0000]])
    """
    x, y, z = d.unbind(-1)
    out = [torch.full_like(x, _C0)]
    if degree >= 1:
        out += [-_C1 * y, _C1 * z, -_C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out += [_C2[0] * xy, _C2[1] * yz, _C2[2] * (2 * zz - xx - yy), _C2[3] * xz, _C2[4] * (xx - yy)]
    if degree >= 3:
        out += [
            _C3[0] * y * (3 * xx - yy),
            _C3[1] * xy * z,
            _C3[2] * y * (4 * zz - xx - yy),
            _C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            _C3[4] * x * (4 * zz - xx - yy),
            _C3[5] * z * (xx - yy),
            _C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(out, dim=-1)


class NeRFField(NeuralField):
    """Density and view-dependent colour on a multi-resolution octree grid (kind ``"nerf"``).

    ``forward(x, d, lod)``: ``x (N, 3)`` unit-cube points, ``d (N, 3)`` unit directions →
    ``σ (N,)``, ``rgb (N, 3)``. :meth:`all_lods` evaluates several LODs sharing one grid lookup.

    ``dataset`` records where the training views came from (source, format, downscale,
    background), so ``vqad render`` / ``vqad eval`` can find the cameras again; it travels in the
    checkpoint and the .vqad file through :meth:`extra_config`.
    """

    kind = "nerf"

    def __init__(
        self,
        grid: OctreeGrid,
        decoder_cfg: DecoderConfig,
        nerf_cfg: NeRFConfig | None = None,
        normalization: Normalization | None = None,
        dataset: dict | None = None,
    ):
        super().__init__(grid, decoder_cfg, normalization)
        self.nerf_cfg = nerf_cfg or NeRFConfig()
        self.nerf_cfg.validate()
        if self.nerf_cfg.step_ratio is None:
            raise InputError("a radiance field needs a marching step: step_ratio=None ('auto') is resolved from the "
                             "octree by vqad.nerf.train.build_nerf_field; pass a number to build a field directly")
        if self.nerf_cfg.outer_scale is None:
            raise InputError("a radiance field needs its outer_scale: None (the dataset's) is resolved by "
                             "vqad.nerf.fit.build_nerf_field; pass a number to build a field directly")
        self.dataset = check_dataset_info({} if dataset is None else dataset)
        self._mlp_dtype: torch.dtype | None = None  # the decoders' autocast dtype (mlp_precision; None: fp32)
        g = self.nerf_cfg.geo_features
        in_dim = grid.k + (3 if decoder_cfg.position_input else 0)
        device = grid.octree.device
        self.decoder = LODDecoder(in_dim, 1 + g, grid.lods, decoder_cfg).to(device)  # ψ_σ
        color_cfg = DecoderConfig(
            hidden=self.nerf_cfg.color_hidden, layers=self.nerf_cfg.color_layers,
            per_lod=decoder_cfg.per_lod, position_input=False,
        )
        self.sh_dim = (self.nerf_cfg.sh_degree + 1) ** 2
        self.color = LODDecoder(g + self.sh_dim, 3, grid.lods, color_cfg).to(device)  # ψ_c
        self._init_density_bias()

    def _init_density_bias(self) -> None:
        # start nearly transparent: σ ≈ 0.1 per unit length, so early rays see through the volume
        # and the gradient reaches every occupied cell, instead of an opaque fog that hides the scene
        with torch.no_grad():
            for mlp in self.decoder.mlps:
                last = mlp.net[-1]
                last.bias[0] = math.log(0.1) if self.nerf_cfg.density_activation == "trunc_exp" else -1.25

    # -- evaluation -----------------------------------------------------------------------------
    @contextmanager
    def mlp_precision(self, dtype: torch.dtype | None):
        """Within the block, the decoders' matrix products run in ``dtype`` (autocast; None: fp32), their
        outputs cast back to fp32 (:func:`vqad.device.resolve_mlp_precision`). Training uses it; renders,
        evaluation, recoding and files stay fp32, so a model renders the same wherever it is loaded."""
        before = self._mlp_dtype
        self._mlp_dtype = dtype
        try:
            yield
        finally:
            self._mlp_dtype = before

    def _decode(self, x: torch.Tensor, feats: torch.Tensor, sh: torch.Tensor, lod: int):
        h_in = torch.cat([feats, x], dim=-1) if self.decoder_cfg.position_input else feats
        dtype = self._mlp_dtype  # fp32 (None) enters no autocast at all: renders and evaluation pay nothing
        with nullcontext() if dtype is None else torch.autocast(device_type=feats.device.type, dtype=dtype):
            h = self.decoder(h_in, lod)  # (N, 1 + g)
            c = self.color(torch.cat([h[:, 1:], sh.to(h.dtype)], dim=-1), lod)  # (N, 3)
        sigma = density_activation(h[:, 0].float(), self.nerf_cfg.density_activation)
        return sigma, torch.sigmoid(c.float())

    def check_directions(self, d, n: int) -> torch.Tensor:
        """``d`` of a query from outside: ``(n, 3)`` view directions as unit float32 vectors on the field's device
        (any non-zero length is normalised: the colour's spherical harmonics take unit vectors). A zero,
        NaN or infinite direction, or another shape, is an :class:`InputError`."""
        d = self.as_rows(d, "d", "view directions", "view directions")
        if d.shape[0] != n:
            raise InputError(f"x and d must hold as many rows, got {n} and {d.shape[0]}")
        d = d.float()
        norm = d.norm(dim=-1, keepdim=True)
        if d.numel() and not bool(((norm > 0) & torch.isfinite(norm)).all()):
            raise InputError("d holds a zero, NaN or infinite view direction: each row must be a direction of "
                             "non-zero length (unit vectors; others are normalised)")
        return d / norm

    def forward(self, x: torch.Tensor, d: torch.Tensor, lod: int | None = None):
        """``σ (N,)`` and ``rgb (N, 3)`` at one LOD (default: the finest), at grid points ``x (N, 3)`` seen
        from directions ``d (N, 3)`` (unit vectors; others are normalised)."""
        x, lod = self.check_points(x), self.check_lod(lod)
        sig, rgb = self.query_lods(x, self.check_directions(d, x.shape[0]), [lod])
        return sig[0], rgb[0]

    def all_lods(self, x: torch.Tensor, d: torch.Tensor, lods: list[int] | None = None,
                 rows: list[torch.Tensor | None] | None = None):
        """Several LODs (default: all), each level's features computed once: :meth:`query_lods` with the
        checks of :meth:`forward` (``x``, ``d``, each LOD). Returns ``σ (n_lods, N)`` and ``rgb (n_lods, N, 3)``."""
        x = self.check_points(x)
        d, lods = self.check_directions(d, x.shape[0]), self.check_lods(lods)
        if rows is not None:
            if isinstance(rows, torch.Tensor) or len(rows) != len(lods):
                raise InputError(f"rows must be a list of one entry per LOD ({len(lods)}), got "
                                 f"{len(rows) if not isinstance(rows, torch.Tensor) else 'a tensor'}")
            for r in rows:
                if r is not None and not (isinstance(r, torch.Tensor) and r.dim() == 1 and r.dtype == torch.int64
                                          and r.device == self.device):
                    raise InputError("each entry of rows must be None or a 1-D int64 tensor of point positions on the "
                                     "field's device")
                if r is not None and r.numel() and not (0 <= int(r.min()) and int(r.max()) < x.shape[0]):
                    raise InputError(f"rows hold positions outside 0..{x.shape[0] - 1}")
        return self.query_lods(x, d, lods, rows)

    def query_lods(self, x: torch.Tensor, d: torch.Tensor, lods: list[int] | None = None,
                   rows: list[torch.Tensor | None] | None = None):
        """:meth:`all_lods` without its checks, for the library's own loops (a render decodes chunk after
        chunk; each check would sync a GPU): ``x (N, 3)`` float32 points and ``d (N, 3)`` unit directions on the
        field's device, ``lods`` of :attr:`lods` (None: all).

        ``rows``: per LOD, the positions ``(N_b,)`` int64 of the points it decodes (None: all); the others
        get ``σ = 0`` and ``rgb = 0`` without running its decoders (early ray termination by LOD,
        :func:`vqad.nerf.render.terminate_rays`).

        Returns ``σ (n_lods, N)`` and ``rgb (n_lods, N, 3)``.
        """
        lods = self.lods if lods is None else lods
        if rows is not None and len(rows) != len(lods):
            raise ValueError(f"all_lods: {len(rows)} row lists for {len(lods)} LODs")
        feats = self.grid.multi_lod_features(x, lods)
        sh = sh_encode(d, self.nerf_cfg.sh_degree)
        sig, rgb = [], []
        for b, (f, lod) in enumerate(zip(feats, lods)):
            idx = None if rows is None else rows[b]
            if idx is None:
                s, c = self._decode(x, f, sh, lod)
            elif idx.numel() == 0:  # a caller's empty list (terminate_rays always keeps each ray's first sample)
                s, c = x.new_zeros(x.shape[0]), x.new_zeros(x.shape[0], 3)
            else:  # σ = 0 contributes nothing to the composite; index_copy passes the gradient to the decoded rows
                s_b, c_b = self._decode(x.index_select(0, idx), f.index_select(0, idx), sh.index_select(0, idx), lod)
                s = s_b.new_zeros(x.shape[0]).index_copy(0, idx, s_b)
                c = c_b.new_zeros(x.shape[0], 3).index_copy(0, idx, c_b)
            sig.append(s)
            rgb.append(c)
        return torch.stack(sig), torch.stack(rgb)

    def densities(self, x: torch.Tensor, lods: list[int] | None = None) -> torch.Tensor:
        """``σ (n_lods, N)`` alone at several LODs (default: all; no colour MLP), each level's features
        computed once, at points ``x (N, 3)``: :meth:`query_densities` with the checks of :meth:`forward`."""
        return self.query_densities(self.check_points(x), self.check_lods(lods))

    def density(self, x: torch.Tensor, lod: int | None = None) -> torch.Tensor:
        """``σ (N,)`` alone (no colour MLP) at one LOD (default: the finest), at points ``x (N, 3)``."""
        return self.query_densities(self.check_points(x), [self.check_lod(lod)])[0]

    def query_densities(self, x: torch.Tensor, lods: list[int]) -> torch.Tensor:
        """:meth:`densities` without its checks, for the library's own loops (pruning, the octree's density
        pass): ``x (N, 3)`` float32 points on the field's device, ``lods`` of :attr:`lods`. Returns
        ``σ (n_lods, N)``."""
        feats = self.grid.multi_lod_features(x, lods)
        out = []
        for f, lod in zip(feats, lods):
            h_in = torch.cat([f, x], dim=-1) if self.decoder_cfg.position_input else f
            out.append(density_activation(self.decoder(h_in, lod)[:, 0], self.nerf_cfg.density_activation))
        return torch.stack(out)

    # -- the generic field interface (checkpoints, .vqad files) ----------------------------------
    EXTRA_KEYS = ("nerf", "dataset")

    def extra_config(self) -> dict:
        return {"nerf": to_dict(self.nerf_cfg), "dataset": dict(self.dataset)}

    def decoders(self) -> list[LODDecoder]:
        return [self.decoder, self.color]

    @classmethod
    def from_config(cls, cfg: dict, grid: OctreeGrid) -> "NeRFField":
        return cls(
            grid,
            from_dict(DecoderConfig, cfg["decoder"]),
            from_dict(NeRFConfig, cfg.get("nerf", {})),
            Normalization.from_dict(cfg["normalization"]),
            dataset=cfg.get("dataset", {}),  # a record of another type (0, [], false) is damage, not absence
        )
