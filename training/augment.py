"""DiffAugment (Zhao et al. 2020): differentiable augmentation for GANs trained on little data.

The same kind of random translation and cutout is applied to every image D sees, real and fake, in D's and
G's steps alike. D then cannot memorise the few thousand training images, and since the generator's
gradient flows through the augmentation, G still learns un-augmented images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TRANSLATE = 1 / 8  # largest shift, as a fraction of the image side (the paper's value)
CUTOUT = 1 / 4  # side of the erased square, as a fraction of the image side (the paper uses 1/2 on CIFAR)


def diff_augment(x: torch.Tensor, generator: torch.Generator, fill: float, cutout: bool = True) -> torch.Tensor:
    """x [B, C, H, W] shifted by up to TRANSLATE and, with `cutout`, one CUTOUT square erased, per image; gaps
    get `fill`."""
    n, _, h, w = x.shape
    s, c = round(h * TRANSLATE), round(h * CUTOUT)
    shift = torch.randint(-s, s + 1, (2, n, 1, 1), generator=generator).to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    padded = F.pad(x, (s, s, s, s), value=fill).permute(0, 2, 3, 1)  # [B, H+2s, W+2s, C]
    out = padded[batch, rows + s + shift[0], cols + s + shift[1]].permute(0, 3, 1, 2)
    if not cutout:
        return out
    r0, c0 = torch.randint(0, h - c + 1, (2, n, 1, 1), generator=generator).to(x.device)
    in_range = lambda i, lo: (i >= lo) & (i < lo + c)  # noqa: E731
    erased = in_range(rows, r0) & in_range(cols, c0)
    return torch.where(erased[:, None], torch.full_like(out, fill), out)
