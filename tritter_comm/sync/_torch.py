"""The torch twin of the Rust packing (src/sync.rs), for tensors on any device: the same scales
and bytes as ``sync::pack``, the same values and validation as ``sync::unpack``."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

from .format import _codes_len, _ngroups

_FIXED_BITS = 30
_POW3 = (1, 3, 9, 27, 81)
_LEVELS: Dict[torch.device, Tensor] = {}


def _levels(device: torch.device) -> Tensor:
    """(243, 5) float32: the trits -1/0/1 of each valid byte."""
    t = _LEVELS.get(device)
    if t is None:
        b = torch.arange(243)
        t = torch.stack([(b // p) % 3 for p in _POW3], 1).float().sub_(1).to(device)
        _LEVELS[device] = t
    return t


def _torch_pack(x: Tensor, group: int, adaptive: bool = False) -> Tuple[Tensor, Tensor]:
    """The torch twin of ``sync::pack`` (any device): the same scales and bytes."""
    n = x.numel()
    ng = _ngroups(n, group)
    dev = x.device
    if ng == 0:
        return torch.empty(0, dtype=torch.float32, device=dev), torch.empty(
            0, dtype=torch.uint8, device=dev)
    xf = x.float()
    if not bool(torch.isfinite(xf).all()):
        raise ValueError("weights contain NaN or Inf")
    pad = ng * group - n
    g = torch.nn.functional.pad(xf, (0, pad)).view(ng, group)
    a = g.abs().double()
    m = a.amax(1)
    # frexp: max|w| = f * 2^e with f in [0.5, 1); |w| * 2^(30 - e) < 2^30 (sync.rs).
    _, e = torch.frexp(m)
    e = torch.where(m > 0, e, torch.full_like(e, -148))
    # 2^(30 - e) built from its bits: exact on every device.
    u = ((1023 + _FIXED_BITS - e.long()) << 52).view(torch.float64)
    q = torch.floor(a * u[:, None]).long()
    lens = torch.full((ng,), group, dtype=torch.float64, device=dev)
    lens[-1] = n - (ng - 1) * group
    gamma = q.sum(1).double() / lens / u

    def candidate(th):
        nz = (2.0 * a) > th[:, None]
        k = nz.sum(1)
        snz = (q * nz).sum(1)
        kd, sd = k.double(), snz.double()
        energy = torch.where(k > 0, sd * (sd / kd.clamp(min=1)), 0.0)
        return nz, k, snz, energy

    nz, k, snz, energy = candidate(gamma)
    if adaptive:  # the better of absmean and |w| > max/2, by captured energy (sync.rs)
        nzb, kb, snzb, eb = candidate(m)
        take = eb > energy
        nz = torch.where(take[:, None], nzb, nz)
        k = torch.where(take, kb, k)
        snz = torch.where(take, snzb, snz)
    scales = torch.where(k > 0, snz.double() / k.clamp(min=1).double() / u, 0.0).float()
    codes = torch.where(nz, torch.where(g > 0, 2, 0), 1).to(torch.uint8)
    if pad:
        codes.view(-1)[n:] = 0
    gb = -(-group // 5)
    codes = torch.nn.functional.pad(codes, (0, 5 * gb - group)).view(ng, gb, 5).long()
    w = torch.tensor(_POW3, dtype=torch.long, device=dev)
    packed = (codes * w).sum(2).to(torch.uint8).view(-1)
    return scales, packed[: _codes_len(n, group)]


def _torch_unpack(scales: Tensor, codes: Tensor, group: int, n: int, dtype) -> Tensor:
    """The torch twin of ``sync::unpack``, with its validation."""
    ng = _ngroups(n, group)
    dev = codes.device
    if ng == 0:
        return torch.empty(0, dtype=dtype, device=dev)
    gb = -(-group // 5)
    full = torch.zeros(ng * gb, dtype=torch.uint8, device=dev)
    full[: codes.numel()] = codes
    full = full.view(ng, gb)
    last_len = n - (ng - 1) * group
    bad = (full > 242).any() | (~torch.isfinite(scales)).any() | torch.signbit(scales).any()
    # The padding codes of each group's last byte are 0: the byte is below 3^(len % 5).
    if group % 5 and ng > 1:
        bad |= (full[: ng - 1, gb - 1] >= 3 ** (group % 5)).any()
    if last_len % 5:
        bad |= full[ng - 1, -(-last_len // 5) - 1] >= 3 ** (last_len % 5)
    if bool(bad):
        raise ValueError(
            "corrupted packed weights: a packed byte above 242, nonzero padding, or a scale "
            "that is not finite and >= 0"
        )
    lv = _levels(dev)[full.long()].view(ng, gb * 5)[:, :group]
    out = (lv * scales[:, None]).reshape(-1)[:n]
    return out.to(dtype)
