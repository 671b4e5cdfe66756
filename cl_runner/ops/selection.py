"""Exact k-th largest value of tensors split over processes (radix select on float bits).

CLASSP's quantile mode moves the top `update_fraction` of each tensor by |g|. On an
FSDP-sharded gradient each rank holds a slice; the threshold must be the one the whole
tensor gives. For non-negative float32 values the int32 bit patterns sort like the
values, so the k-th largest is found byte by byte, most significant first: per pass each
rank counts its values in 256 bins (among those matching the bytes chosen so far), one
all-reduce sums the counts of every tensor at once, and each tensor's next byte is the
bin where the running count from the top reaches k. Four passes, four small collectives
(tensors x 256 counts), no values exchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def kth_largest(values: Sequence[Tensor], ks: Sequence[int], group=None) -> list[float]:
    """For each tensor (this rank's part of a non-negative float tensor), the k-th largest
    value of the whole tensor across the processes of `group` (1 <= k <= its numel)."""
    import torch.distributed as dist

    if not values:
        return []
    device = values[0].device
    bits = [v.detach().float().contiguous().view(-1).view(torch.int32) for v in values]
    count = len(bits)
    prefix = [0] * count
    remaining = torch.tensor(list(ks), dtype=torch.int64)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    for shift in (24, 16, 8, 0):
        hist = torch.zeros((count, 256), dtype=torch.int64, device=device)
        for i, b in enumerate(bits):
            chosen = b if shift == 24 else b[(b >> (shift + 8)) == prefix[i]]
            hist[i] = torch.bincount((chosen >> shift) & 0xFF, minlength=256)
        if distributed:
            dist.all_reduce(hist, group=group)
        hist = hist.cpu()
        from_top = hist.flip(1).cumsum(1)  # values in bins >= 255 - j
        for i in range(count):
            j = int(torch.searchsorted(from_top[i], remaining[i]))
            byte = 255 - j
            above = int(from_top[i, j] - hist[i, byte])
            remaining[i] -= above
            prefix[i] = (prefix[i] << 8) | byte
    return [torch.tensor(p, dtype=torch.int64).to(torch.int32).view(torch.float32).item() for p in prefix]
