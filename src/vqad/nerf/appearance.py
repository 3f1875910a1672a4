"""Per-view appearance: each training photo's own exposure and white balance, learned beside the field.

A phone meters every photo anew: auto exposure and auto white balance change the colour of the same
surface from one photo to the next by tens of percent. A field fitted to such photos explains the
differences it cannot reproduce with the view direction as colour floaters in front of the cameras,
and the held-out views pay for them. :class:`ViewAppearance` gives each training view ``i`` a colour
transform applied to what the field renders for that view's rays, before the loss::

    C'_i = g_i ⊙ C + o_i,    g_i = exp(ℓ_i − mean_j ℓ_j),    o_i = β_i − mean_j β_j

with ``ℓ_i, β_i ∈ R³`` per channel (``affine``: gain and offset, 6 numbers a view). A gain per channel
is what a change of exposure and white balance does to a linear or a power-law-encoded (sRGB-like)
colour; the offset takes black level and haze. Subtracting the means over the views fixes the gauge:
the field's own colours are the *average* appearance of the training photos, not whatever the first
steps drifted to, so a held-out view, whose photo has no transform of its own, is rendered and scored
with the identity (the field as it is). The transform lives outside the field: the .vqad file, the
viewer and every render hold the average appearance; only the checkpoint keeps the transforms, to
resume. docs/method.md §8.5 has the measurements.
"""

from __future__ import annotations

import torch

from vqad.errors import InputError

APPEARANCES = ("none", "affine")

#: the transforms' Adam learning rate, as a share of the decoders' (docs/method.md §8.5)
APPEARANCE_LR_SCALE = 1.0


class ViewAppearance(torch.nn.Module):
    """Per-channel gain and offset of each of ``n_views`` training views, identity at the start.

    Parameters: ``log_gain (V, 3)`` and ``offset (V, 3)``, the ℓ and β of the module docstring.
    """

    def __init__(self, n_views: int, device=None):
        super().__init__()
        if n_views < 1:
            raise ValueError(f"ViewAppearance needs at least one view, got {n_views}")
        self.log_gain = torch.nn.Parameter(torch.zeros(n_views, 3, device=device))
        self.offset = torch.nn.Parameter(torch.zeros(n_views, 3, device=device))

    @property
    def n_views(self) -> int:
        return self.log_gain.shape[0]

    def transforms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every view's gain and offset with the gauge fixed: ``(V, 3)`` each, the gains' geometric mean and
        the offsets' mean 1 and 0 per channel."""
        return (torch.exp(self.log_gain - self.log_gain.mean(0)), self.offset - self.offset.mean(0))

    def forward(self, rgb: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """``rgb (..., B, 3)`` (e.g. one row per LOD) of rays from training views ``views (B,)`` → the
        colours their photos would record: ``g_view ⊙ rgb + o_view``, same shape."""
        gain, offset = self.transforms()
        return rgb * gain.index_select(0, views) + offset.index_select(0, views)

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint keeps (:meth:`load`)."""
        return {"log_gain": self.log_gain.detach(), "offset": self.offset.detach()}

    def load(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Restore :meth:`state` read from ``where`` (a checkpoint), validated: an :class:`InputError` for
        missing tensors, another number of views, or values that are not finite."""
        shape = tuple(self.log_gain.shape)
        for name, param in (("log_gain", self.log_gain), ("offset", self.offset)):
            t = tensors.get(name)
            if t is None:
                raise InputError(f"{where}: the checkpoint has no per-view appearance ({name}) although it was trained "
                                 f"with --appearance: it is damaged; start a new fit")
            if tuple(t.shape) != shape:
                raise InputError(f"{where}: the checkpoint's per-view appearance is for {t.shape[0] if t.dim() else 0} "
                                 f"training views, this capture has {shape[0]}: use the capture the fit was trained on")
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise InputError(f"{where}: the checkpoint's per-view appearance ({name}) holds values that are not "
                                 f"finite numbers: it is damaged; start a new fit")
            with torch.no_grad():
                param.copy_(t.to(param))

    def summary(self) -> str:
        """One line on how far the views' transforms spread: the gains' range per channel, and the offsets'."""
        gain, offset = (t.detach() for t in self.transforms())
        lo, hi = gain.min(0).values.tolist(), gain.max(0).values.tolist()
        rng = ", ".join(f"{c} {a:.2f}–{b:.2f}" for c, a, b in zip("RGB", lo, hi))
        return (f"per-view appearance: gains {rng}; offsets within ±{float(offset.abs().max()):.3f} "
                f"(the field holds the views' average)")


def checkpoint_appearance(path, n_views: int) -> ViewAppearance | None:
    """The training views' transforms a checkpoint directory ``path`` keeps (a fit with ``--appearance
    affine``), validated against ``n_views`` training views; None for a checkpoint without them, or a
    ``.vqad`` file (which holds the average appearance only)."""
    from pathlib import Path

    from vqad.checkpoint import read_config, read_task_tensors

    path = Path(path)
    if not path.is_dir():
        return None
    train = read_config(path).get("train")
    if not isinstance(train, dict) or train.get("appearance", "none") == "none":
        return None
    if train["appearance"] not in APPEARANCES:
        raise InputError(f"{path}: the checkpoint's appearance {train['appearance']!r} is not one this vqad knows "
                         f"({', '.join(APPEARANCES)})")
    if n_views < 1:
        raise InputError(f"{path} was fitted with a per-view appearance, and this capture has no training views to "
                         f"apply it to: use the capture the fit was trained on")
    app = ViewAppearance(n_views)
    app.load(read_task_tensors(path, "appearance."), str(path))
    return app


def appearance_scoring(appearance: ViewAppearance | None, split: str) -> dict:
    """How an evaluation of ``split`` scores a model trained with ``appearance`` (None: without): the
    training views through their own transforms (``appearance=``), any other split in the average
    appearance and also with each photo's exposure matched (``match_exposure=``: its camera metered it
    anew, as it did the training photos); nothing for a model trained without."""
    if appearance is None:
        return {}
    return {"appearance": appearance} if split == "train" else {"match_exposure": True}
