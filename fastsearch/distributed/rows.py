"""A batch of rows (candidates, particles) split over the ranks of a group, one contiguous run each.

The searches lay out their candidates prompt-major, row ``p * C + c`` of R = P C rows; with ``group=`` rank w
holds rows ``[R w // W, R (w + 1) // W)``: an equal share within one row, every prompt's candidates split into
contiguous shards (:meth:`fastsearch.distributed.Shards.split_rows`), and one contiguous run of the Philox stream
for the rank's noise. Without a group one process holds every row and every method is the plain local operation.
"""

from __future__ import annotations

import torch

from fastsearch.distributed.ops import exchange_rows
from fastsearch.distributed.shards import RankFailed, Shards, all_gather_stacked, world


class Rows:
    """R rows split over ``group`` (None: all on this process).

    Attributes:
        total: R, the rows of the whole batch.
        low, high: this rank's rows ``[low, high)``.
        bounds: [W + 1] the runs' bounds, ``bounds[w] = R w // W``.
    """

    def __init__(self, total: int, group=None):
        self.total, self.group = total, group
        self.rank, self.world_size = (0, 1) if group is None else world(group)
        self.bounds = [total * w // self.world_size for w in range(self.world_size + 1)]
        self.low, self.high = self.bounds[self.rank], self.bounds[self.rank + 1]

    @property
    def count(self) -> int:
        """The rows this rank holds."""
        return self.high - self.low

    @property
    def row_offset(self) -> int | None:
        """Where this rank's rows start in the batch, for :meth:`~fastsearch.diffusion.Sampler.run`; None alone."""
        return None if self.group is None else self.low

    def local(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a tensor that every rank holds whole ([R, ...] -> [count, ...])."""
        return batch if self.group is None else batch[self.low:self.high]

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's rows, [count, ...] -> [R, ...] on every rank (one all_gather of the longest run)."""
        if self.group is None:
            return local
        longest = max(b - a for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True))
        padded = local.new_zeros((longest,) + tuple(local.shape[1:]))
        padded[:local.shape[0]] = local
        stacked = all_gather_stacked(padded, self.group)
        return torch.cat([stacked[w, :self.bounds[w + 1] - self.bounds[w]] for w in range(self.world_size)])

    def gather_scores(self, what: str, score) -> torch.Tensor:
        """``score()`` of this rank's rows (float32 [count]) gathered to [R] on every rank, in one all_gather that
        also carries whether each rank's call raised: if any did, every rank raises
        :class:`~fastsearch.distributed.RankFailed` naming those ranks (no rank waits forever)."""
        if self.group is None:
            return score()
        error, scores = None, None
        try:
            scores = score()
        except Exception as err:  # noqa: BLE001 - reported to every rank, then re-raised here
            error = err
        longest = max(b - a for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True))
        packed = torch.zeros(longest + 1, dtype=torch.float64)
        if error is None:
            packed[:self.count] = scores.detach().to("cpu", torch.float64)
        packed[-1] = error is not None
        stacked = all_gather_stacked(packed, self.group)
        failed = stacked[:, -1].nonzero().flatten().tolist()
        if failed:
            message = f"{what} raised on rank(s) {failed}"
            if error is not None:
                raise RankFailed(f"{message}: {type(error).__name__}: {error}") from error
            raise RankFailed(f"{message}; see that rank's error")
        gathered = torch.cat([stacked[w, :self.bounds[w + 1] - self.bounds[w]] for w in range(self.world_size)])
        return gathered.to(scores.device, torch.float32)

    def take(self, local: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (int64 [K] batch indices, the same on every rank) of the batch: [K, ...] on every rank.

        Each rank contributes the ones it holds: one all_gather of [K, ...] (K W rows moved, not R)."""
        if self.group is None:
            return local[rows.to(local.device)]
        wanted = rows.cpu()
        held = (wanted >= self.low) & (wanted < self.high)
        mine = local.new_zeros((wanted.numel(),) + tuple(local.shape[1:]))
        mine[held.to(local.device)] = local[(wanted[held] - self.low).to(local.device)]
        stacked = all_gather_stacked(mine, self.group)
        owner = torch.searchsorted(torch.tensor(self.bounds), wanted, right=True) - 1
        return stacked[owner.to(local.device), torch.arange(wanted.numel(), device=local.device)]

    def exchange(self, local: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
        """This rank's rows of ``batch[ancestors]`` ([R] batch indices, the same on every rank): only the rows it
        lacks travel (:func:`~fastsearch.distributed.exchange_rows`); the layout stays the same."""
        if self.group is None:
            return local[ancestors.to(local.device)]
        source = Shards.split_rows(1, self.total, self.world_size)
        return exchange_rows(local, ancestors.reshape(-1), source, group=self.group)
