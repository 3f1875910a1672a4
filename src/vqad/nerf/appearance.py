"""Per-view appearance: each training photo's own exposure and white balance, learned beside the field.

A phone meters every photo anew: auto exposure and auto white balance change the colour of the same
surface from one photo to the next by tens of percent. A field fitted to such photos explains the
differences it cannot reproduce with the view direction as colour floaters in front of the cameras,
and the held-out views pay for them. :class:`ViewAppearance` gives each training view ``i`` a colour
transform applied to what the field renders for that view's rays, before the loss::

    C'_i = g_i ⊙ C + o_i,    g_i = exp(ℓ_i − mean_j ℓ_j),    o_i = β_i − mean_j β_j

with ``ℓ_i, β_i ∈ R³`` per channel (``affine``: gain and offset, 6 numbers a view), the means over the
views that have pixels to train on (a view its loss mask empties stays the identity). Where the reader
composited the photos on the background (their alpha: an object capture), the background was never
photographed: the transform applies to the field's own colour, before it is composited
(:func:`apply_look`). A gain per channel is what a change of exposure and white balance does to a linear
or a power-law-encoded (sRGB-like) colour; the offset takes black level and haze. Subtracting the means over the views fixes the gauge:
the field's own colours are the *average* appearance of the training photos, not whatever the first
steps drifted to, so a held-out view, whose photo has no transform of its own, is rendered and scored
with the identity (the field as it is). The transform lives outside the field: the .vqad file, the
viewer and every render hold the average appearance; only the checkpoint keeps the transforms, to
resume. docs/method.md §8.5 has the measurements.
"""

from __future__ import annotations

import torch

from vqad.errors import InputError
from vqad.metrics import psnr
from vqad.nerf.data import kept_views

APPEARANCES = ("none", "affine")

#: the transforms' Adam learning rate as a share of the grid's (``lr × grid_lr_scale``): a transform slower than the
#: field leaves part of its photo's exposure in the field's view-dependent colour, which a held-out view between
#: photos inherits. Measured with the grid's default ×30 (docs/method.md §8.5; the generated room, σ = 0.3 stops,
#: 800 dense steps, LOD 7, seed 0), as multiples of the decoders' rate: ×0.3 29.92 dB, ×1 30.89, ×3 31.27, ×10 31.40,
#: ×30 31.60, ×100 31.92 (seed 1: ×1 31.31, ×10 31.88, ×30 31.73, ×100 31.66); the clean room 31.73 without transforms
APPEARANCE_LR_SHARE = 1.0

#: the prefix of the transforms among a checkpoint's task tensors (vqad.checkpoint.read_task_tensors)
TENSOR_PREFIX = "appearance."

#: the largest |ℓ| and |β| a checkpoint may hold: a gain of e^±10 or an offset of ±10 (colours are in
#: [0, 1]) is no photo's exposure, and would overflow the renders
MAX_LOG_GAIN, MAX_OFFSET = 10.0, 10.0


def apply_look(rgb: torch.Tensor, gain: torch.Tensor, offset: torch.Tensor, opacity: torch.Tensor | None = None,
               background: torch.Tensor | None = None) -> torch.Tensor:
    """Rendered colours ``rgb (..., R, 3)`` as photos with gains and offsets ``(R, 3)`` (or ``(3,)``, one photo) recorded them:
    ``g ⊙ rgb + o``; or, with ``background (3,)`` and the rays' ``opacity (..., R)`` (the reader composited
    the photos on that background, which the camera never saw), ``g ⊙ F + A·o + (1 − A)·background`` with
    ``F = rgb − (1 − A)·background`` the field's own, premultiplied colour."""
    if background is None:
        return rgb * gain + offset
    a = opacity.unsqueeze(-1)
    rest = (1.0 - a) * background
    return (rgb - rest) * gain + a * offset + rest


def clipped_like(pred: torch.Tensor, photo: torch.Tensor) -> torch.Tensor:
    """``pred (..., R, 3)`` where the camera clipped: a channel the ``photo (R, 3)`` records at white (1) or black
    (0) takes the photo's value wherever ``pred`` is beyond it (any brighter colour records as white), so a
    transform that brightens a photo is not pulled back by its blown highlights; elsewhere ``pred``. Not for
    photos composited on a background (:attr:`~vqad.nerf.data.Views.composited`): their white there is the
    background's, and a floater over it would cost nothing."""
    over = ((photo >= 1.0) & (pred > 1.0)) | ((photo <= 0.0) & (pred < 0.0))
    return torch.where(over, photo.expand_as(pred), pred)


def as_photographed(rgb: torch.Tensor, gain: torch.Tensor, offset: torch.Tensor, opacity: torch.Tensor,
                    background: torch.Tensor | None, photo: torch.Tensor) -> torch.Tensor:
    """What training compares with the ``photo (R, 3)``: the rendering ``rgb (..., R, 3)`` through its
    photo's ``gain, offset (R, 3)`` (:func:`apply_look`, before compositing on ``background`` where the
    reader composited the photos on it: ``opacity (..., R)``), and where the camera recorded every pixel,
    :func:`clipped_like` the photo."""
    seen = apply_look(rgb, gain, offset, opacity, background)
    return seen if background is not None else clipped_like(seen, photo)


#: the fewest pixels a channel's exposure is fitted to (:func:`exposure_matched`)
MIN_MATCH_PIXELS = 64


def exposure_matched(pred: torch.Tensor, gt: torch.Tensor, keep: torch.Tensor | None = None,
                     opacity: torch.Tensor | None = None, background: torch.Tensor | None = None) -> torch.Tensor:
    """``pred (H, W, 3)`` as the photo ``gt`` would have recorded it: each channel's gain (≥ 0) and offset
    fitted to ``gt`` by least squares, applied by :func:`apply_look`, clamped to [0, 1].

    The fit runs over the pixels ``keep (H, W)`` marks (all without it) where the photo's channel is not
    clipped (strictly between 0 and 1: a blown highlight says nothing about the gain). With ``background
    (3,)`` and the render's ``opacity (H, W)`` (a photo the reader composited on that background, which
    the camera never saw), it runs over the opaque pixels (opacity > 0.99) and the transform applies to
    the foreground before compositing. A channel with fewer than :data:`MIN_MATCH_PIXELS` such pixels
    keeps gain 1 and offset 0 (two numbers fitted to a few pixels would match them exactly), one that
    ``pred`` holds constant there gain 1."""
    pred = pred.float()
    g = gt.float().to(pred.device)
    use = torch.ones(pred.shape[:-1], dtype=torch.bool, device=pred.device) if keep is None else keep.to(pred.device)
    if background is not None:
        opacity, background = opacity.to(pred.device), background.to(pred.device)
        use = use & (opacity > 0.99)
    gains, offsets = [], []
    for c in range(3):
        sel = use & (g[..., c] > 0) & (g[..., c] < 1)
        p, t = pred[..., c][sel], g[..., c][sel]
        if p.numel() < MIN_MATCH_PIXELS:  # too few to tell an exposure from the field's error: the identity
            gains.append(pred.new_tensor(1.0))
            offsets.append(pred.new_tensor(0.0))
            continue
        var = ((p - p.mean()) ** 2).mean()
        gain = ((p - p.mean()) * (t - t.mean())).mean() / var if var > 1e-10 else pred.new_tensor(1.0)
        gain = gain.clamp_min(0.0)
        gains.append(gain)
        offsets.append(t.mean() - gain * p.mean())
    return apply_look(pred, torch.stack(gains), torch.stack(offsets), opacity, background).clamp(0, 1)


def psnr_matched(pred: torch.Tensor, gt: torch.Tensor, keep: torch.Tensor | None = None,
                 opacity: torch.Tensor | None = None, background: torch.Tensor | None = None) -> float:
    """PSNR of ``pred (H, W, 3)`` as the photo's own exposure would have recorded it: of
    :func:`exposure_matched`, or of ``pred`` itself where that scores higher (the identity is a transform
    too; a fit to the opaque, unclipped pixels can lose on the others), so never below
    :func:`vqad.metrics.psnr`."""
    return max(psnr(pred, gt, keep), psnr(exposure_matched(pred, gt, keep, opacity, background), gt, keep))


class ViewAppearance(torch.nn.Module):
    """Per-channel gain and offset of each of ``n_views`` training views, identity at the start.

    Parameters: ``log_gain (V, 3)`` and ``offset (V, 3)``, the ℓ and β of the module docstring;
    ``active (V,) bool``: the views with pixels to train on (default: all), whose means fix the gauge;
    the others stay the identity (nothing constrains them).
    """

    def __init__(self, n_views: int, device=None, active: torch.Tensor | None = None):
        super().__init__()
        if n_views < 1:
            raise ValueError(f"ViewAppearance needs at least one view, got {n_views}")
        self.log_gain = torch.nn.Parameter(torch.zeros(n_views, 3, device=device))
        self.offset = torch.nn.Parameter(torch.zeros(n_views, 3, device=device))
        if active is None:
            active = torch.ones(n_views, dtype=torch.bool)
        if active.shape != (n_views,) or active.dtype != torch.bool:
            raise ValueError(f"ViewAppearance: active must be ({n_views},) bool, not {active.dtype} {tuple(active.shape)}")
        # (V, 1) float: 1 for a view whose transform is learned, 0 for one held at the identity
        self.register_buffer("_active", active.to(device=self.log_gain.device, dtype=torch.float32)[:, None],
                             persistent=False)

    @property
    def n_views(self) -> int:
        return self.log_gain.shape[0]

    def transforms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every view's gain and offset with the gauge fixed: ``(V, 3)`` each, the active views' gains of
        geometric mean 1 and offsets of mean 0 per channel, the others 1 and 0."""
        w = self._active
        n = w.sum().clamp_min(1.0)
        log_gain = (self.log_gain - (self.log_gain * w).sum(0) / n) * w
        offset = (self.offset - (self.offset * w).sum(0) / n) * w
        return torch.exp(log_gain), offset

    def looks(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The gain and offset ``(R, 3)`` each of the training views ``views (R,)`` (one per ray)."""
        gain, offset = self.transforms()
        return gain.index_select(0, views), offset.index_select(0, views)

    def forward(self, rgb: torch.Tensor, views: torch.Tensor, opacity: torch.Tensor | None = None,
                background: torch.Tensor | None = None) -> torch.Tensor:
        """``rgb (..., R, 3)`` (e.g. one row per LOD) of rays from training views ``views (R,)`` → the
        colours their photos would record (:func:`apply_look`; ``opacity (..., R)`` and ``background (3,)``
        where the reader composited the photos on it), same shape."""
        return apply_look(rgb, *self.looks(views), opacity, background)

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint keeps (:meth:`load`): the gauge-fixed ℓ and β (inactive views 0), which
        give the same transforms whichever views a reader counts as active, and whatever shift the raw
        parameters drifted by (Adam's moments do not depend on it)."""
        with torch.no_grad():
            gain, offset = self.transforms()
            return {"log_gain": gain.log(), "offset": offset}

    def load(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Restore :meth:`state` read from ``where`` (a checkpoint), validated: an :class:`InputError` for
        missing tensors, another number of views or channels, and values that are not numbers in range."""
        damaged = "the checkpoint is damaged; start a new fit"
        for name, param, bound in (("log_gain", self.log_gain, MAX_LOG_GAIN), ("offset", self.offset, MAX_OFFSET)):
            t = tensors.get(name)
            if t is None:
                raise InputError(f"{where}: no per-view appearance ({name}) although the fit was trained with "
                                 f"--appearance: {damaged}")
            if t.dim() != 2 or t.shape[1] != 3:
                raise InputError(f"{where}: the per-view appearance's {name} has shape {tuple(t.shape)}, not (views, 3): "
                                 f"{damaged}")
            if t.shape[0] != self.n_views:
                raise InputError(f"{where}: the per-view appearance is for {t.shape[0]} training views, this capture "
                                 f"has {self.n_views}: use the capture the fit was trained on")
            if not t.is_floating_point():
                raise InputError(f"{where}: the per-view appearance's {name} holds {t.dtype} values, not floating-point "
                                 f"numbers: {damaged}")
            t = t.float()
            if not bool(torch.isfinite(t).all()) or float(t.abs().max()) > bound:
                raise InputError(f"{where}: the per-view appearance's {name} holds values that are not finite numbers "
                                 f"within ±{bound:g}: {damaged}")
            with torch.no_grad():
                param.copy_(t.to(param))

    def summary(self) -> str:
        """One line on how far the active views' transforms spread: the gains' range per channel, and the offsets'."""
        gain, offset = (t.detach() for t in self.transforms())
        active = self._active[:, 0] > 0
        if not bool(active.any()):
            return "per-view appearance: no view had pixels to learn it from"
        gain, offset = gain[active], offset[active]
        lo, hi = gain.min(0).values.tolist(), gain.max(0).values.tolist()
        rng = ", ".join(f"{c} {a:.2f}–{b:.2f}" for c, a, b in zip("RGB", lo, hi))
        return (f"per-view appearance: gains {rng}; offsets within ±{float(offset.abs().max()):.3f} "
                f"(the field holds the views' average)")


def composited_background(views, background, device=None) -> torch.Tensor | None:
    """``background (3,)`` as a tensor on ``device`` where the reader composited ``views``' photos on it
    (:attr:`~vqad.nerf.data.Views.composited`), so a photo's transform applies before compositing
    (:func:`apply_look`); None where the camera recorded every pixel."""
    return torch.as_tensor(background, dtype=torch.float32, device=device) if views.composited else None


def require_views_to_learn(views) -> None:
    """A per-view appearance needs two training views with pixels: with one, the gauge (its transform's
    mean is the identity) leaves nothing to learn, and ``--appearance`` could not apply."""
    n = kept_views(views)
    if n < 2:
        raise InputError(f"--appearance learns how each training photo's exposure differs from the others', and this "
                         f"capture has {n} training view{'' if n == 1 else 's'} with pixels to learn from: leave "
                         f"--appearance out")


def check_appearance_views(config: dict, names: list[str], where: str) -> None:
    """The training photos a checkpoint's transforms were learned from (its config dict's
    ``appearance_views``; a checkpoint without the key does not say) must be ``names``, in order."""
    if "appearance_views" not in config or not names:
        return
    recorded = config["appearance_views"]
    if not isinstance(recorded, list) or not recorded or not all(isinstance(x, str) for x in recorded):
        raise InputError(f"{where}: its appearance_views is not a list of photo names: the checkpoint is damaged; "
                         f"start a new fit")
    if recorded != names:
        raise InputError(f"{where}: the per-view appearance is for the training photos {_few(recorded)}, this "
                         f"capture's are {_few(names)}: use the capture the fit was trained on")


def appearance_of(config: dict) -> str:
    """The ``--appearance`` a checkpoint's config dict records ("none" for one from before the setting)."""
    train = config.get("train")
    value = train.get("appearance", "none") if isinstance(train, dict) else "none"
    return value if isinstance(value, str) else repr(value)


def checkpoint_scoring(path, split: str, views) -> dict:
    """:func:`appearance_scoring` of a model ``path`` (a checkpoint directory or a ``.vqad`` file, which holds
    the average appearance only), scoring ``split``: for ``train``, the transforms of the training ``views``
    (a :class:`~vqad.nerf.data.Views`) the checkpoint keeps, validated against them (:func:`checkpoint_appearance`)."""
    from pathlib import Path

    from vqad.checkpoint import read_config

    path = Path(path)
    if not path.is_dir():
        return {}
    config = read_config(path)
    trained = appearance_of(config) != "none"
    looks = checkpoint_appearance(path, config, views) if trained and split == "train" else None
    return appearance_scoring(trained, split, looks)


def checkpoint_appearance(path, config: dict, views) -> ViewAppearance:
    """The transforms of the training ``views`` that the checkpoint directory ``path`` (its config dict
    ``config``, fitted with ``--appearance``) keeps, validated against them: their number and names."""
    from vqad.checkpoint import read_task_tensors

    setting = appearance_of(config)
    if setting not in APPEARANCES:
        raise InputError(f"{path}: the checkpoint's appearance {setting!r} is not one this vqad knows "
                         f"({', '.join(APPEARANCES)}): the checkpoint is damaged, or from a newer vqad")
    n = 0 if views is None else len(views)
    if n < 1:
        raise InputError(f"{path} was fitted with a per-view appearance, and this capture has no training views to "
                         f"apply it to: use the capture the fit was trained on")
    check_appearance_views(config, [str(x) for x in views.names], str(path))
    app = ViewAppearance(n)
    app.load(read_task_tensors(path, TENSOR_PREFIX), str(path))
    return app


def _few(names) -> str:
    names = [str(x) for x in names]
    return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")


def appearance_scoring(trained: bool, split: str, appearance: ViewAppearance | None = None) -> dict:
    """How an evaluation of ``split`` scores a model ``trained`` with a per-view appearance: the training
    views through their own transforms (``appearance=``, given), any other split in the average
    appearance and also with each photo's exposure matched (``match_exposure=``: its camera metered it
    anew, as it did the training photos); nothing for a model trained without."""
    if not trained:
        return {}
    if split == "train":
        return {} if appearance is None else {"appearance": appearance}
    return {"match_exposure": True}
