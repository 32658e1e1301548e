"""Where each rank's candidates sit in the global candidate list, and the collectives the distributed ops share.

Layout: G groups; in every group, rank 0's candidates come first, then rank 1's, and so on (contiguous shards;
a rank may hold none of a group). The *global* candidate list is what one process would hold: group-major,
group ``g`` being the concatenation over ranks of the ranks' shards of ``g``. A global *flat* index is a
position in that list (``offsets[g] + position in the group``); for dense input ([G, C] on one process) the ops
report row-local positions instead, as the single-process ops do.

Every function here is a collective over ``group`` (a ``torch.distributed`` process group, None for the default
group): every rank of the group must call it, in the same order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.distributed as dist


def world(group) -> tuple[int, int]:
    """``(rank, world size)`` of this process in ``group``; a ValueError when torch.distributed is not set up."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group was given but torch.distributed is not initialised: call "
                         "torch.distributed.init_process_group first (torchrun sets up its environment)")
    return dist.get_rank(group), dist.get_world_size(group)


def comm_device(group) -> torch.device:
    """The device collectives on ``group`` take: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_stacked(tensor: torch.Tensor, group) -> torch.Tensor:
    """[W, *shape]: ``tensor`` (the same shape on every rank) from every rank, in rank order."""
    device = comm_device(group)
    local = tensor.contiguous().to(device)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local, group=group)
    return torch.stack(parts).to(tensor.device)


def as_bits(values: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a floating-point tensor as int64 (exact for float64/32/16 and bfloat16)."""
    width = {8: torch.int64, 4: torch.int32, 2: torch.int16}[values.element_size()]
    return values.contiguous().view(width).to(torch.int64)


def from_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`as_bits`."""
    width = {8: torch.int64, 4: torch.int32, 2: torch.int16}[torch.empty((), dtype=dtype).element_size()]
    return bits.to(width).view(dtype)


@dataclass(frozen=True)
class Shards:
    """How G groups of candidates are split over W ranks: ``sizes[w, g]`` candidates of group g on rank w.

    Attributes:
        sizes: [W, G] int64 on the CPU.
    """

    sizes: torch.Tensor

    @staticmethod
    def gather(local_sizes: torch.Tensor, group) -> Shards:
        """The layout from each rank's [G] local group sizes (one all_gather of G int64 per rank)."""
        return Shards(all_gather_stacked(local_sizes.to(torch.int64).cpu(), group))

    @staticmethod
    def split_rows(num_groups: int, per_group: int, world_size: int) -> Shards:
        """The rows ``0 .. G * C - 1`` of G equal groups of C, split into W contiguous runs of (nearly) equal
        length, ``[R w // W, R (w + 1) // W)`` with R = G * C: every rank gets an equal share (within one row), and
        a rank's rows are one contiguous run of the global flat list."""
        rows = num_groups * per_group
        bounds = torch.tensor([rows * w // world_size for w in range(world_size + 1)])
        group_start = torch.arange(num_groups) * per_group
        low = torch.maximum(bounds[:-1, None], group_start[None, :])
        high = torch.minimum(bounds[1:, None], group_start[None, :] + per_group)
        return Shards((high - low).clamp(min=0))

    @property
    def world_size(self) -> int:
        return self.sizes.shape[0]

    @property
    def num_groups(self) -> int:
        return self.sizes.shape[1]

    @property
    def group_sizes(self) -> torch.Tensor:
        """[G] candidates per group over all ranks."""
        return self.sizes.sum(0)

    @property
    def offsets(self) -> torch.Tensor:
        """[G + 1] global offsets of the groups."""
        return torch.cat([torch.zeros(1, dtype=torch.int64), self.group_sizes.cumsum(0)])

    @property
    def starts(self) -> torch.Tensor:
        """[W, G] the position within group g of rank w's first candidate."""
        return self.sizes.cumsum(0) - self.sizes

    def local_offsets(self, rank: int) -> torch.Tensor:
        """[G + 1] offsets of rank ``rank``'s local flat list."""
        return torch.cat([torch.zeros(1, dtype=torch.int64), self.sizes[rank].cumsum(0)])

    def local_rows(self, rank: int) -> int:
        return int(self.sizes[rank].sum())

    def global_index(self) -> torch.Tensor:
        """[W, Tmax] the global flat index of every rank's local flat candidate (-1 past its end)."""
        width = max(int(self.sizes.sum(1).max()), 0) if self.world_size else 0
        out = torch.full((self.world_size, width), -1, dtype=torch.int64)
        offsets = self.offsets
        for rank in range(self.world_size):
            groups = torch.repeat_interleave(torch.arange(self.num_groups), self.sizes[rank])
            local = self.local_offsets(rank)
            position = torch.arange(groups.numel()) - local[groups]
            out[rank, :groups.numel()] = offsets[groups] + self.starts[rank][groups] + position
        return out

    def owners(self, global_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rank, local flat row) of each global flat index in ``global_rows`` (CPU int64, any shape)."""
        table = self.global_index()
        total = int(self.group_sizes.sum())
        rank_of = torch.empty(total, dtype=torch.int64)
        row_of = torch.empty(total, dtype=torch.int64)
        for rank in range(self.world_size):
            held = table[rank][table[rank] >= 0]
            rank_of[held] = rank
            row_of[held] = torch.arange(held.numel())
        return rank_of[global_rows], row_of[global_rows]


def gather_candidates(values: torch.Tensor, shards: Shards, group) -> torch.Tensor:
    """The global flat list [T] of a per-candidate tensor whose local flat part ``values`` [t, ...] each rank holds
    (one all_gather of the longest local part)."""
    width = max(int(shards.sizes.sum(1).max()), 0)
    padded = values.new_zeros((width,) + tuple(values.shape[1:]))
    padded[:values.shape[0]] = values
    stacked = all_gather_stacked(padded, group)
    table = shards.global_index().to(values.device)
    out = values.new_empty((int(shards.group_sizes.sum()),) + tuple(values.shape[1:]))
    held = table >= 0
    out[table[held]] = stacked[held]
    return out


# -- agreement and faults ---------------------------------------------------------------------------------------


def _fingerprint(value) -> int:
    digest = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def check_same_arguments(what: str, arguments: dict, group) -> None:
    """Raise a ValueError on every rank when the ranks disagree on any of ``arguments`` (name -> value, compared by
    ``repr``), naming the arguments and each rank's value; one all_gather of one int64 per argument."""
    names = list(arguments)
    if not names:
        return
    mine = torch.tensor([_fingerprint(arguments[name]) for name in names], dtype=torch.int64)
    everyone = all_gather_stacked(mine, group)
    differ = [name for column, name in enumerate(names) if bool((everyone[:, column] != everyone[0, column]).any())]
    if differ:
        raise ValueError(f"{what}: the ranks of the group disagree on {', '.join(differ)} (this rank, "
                         f"{dist.get_rank(group)}, has {', '.join(f'{n}={arguments[n]!r}' for n in differ)}); every "
                         "rank must pass the same arguments")


class RankFailed(RuntimeError):
    """Raised on every rank of a group when a call failed on some rank (the failing rank chains its own error)."""


def run_guarded(what: str, call, group):
    """Run ``call()`` on every rank and agree on the outcome (one all_reduce of one int): if it raised on any rank,
    every rank raises :class:`RankFailed` naming the failing ranks, instead of the others waiting forever in the
    next collective. A rank that dies outright is caught by the process group's own ``timeout``."""
    error = None
    try:
        result = call()
    except Exception as err:  # noqa: BLE001 - reported to every rank, then re-raised here
        error, result = err, None
    failed = torch.zeros(dist.get_world_size(group), dtype=torch.int64)
    failed[dist.get_rank(group)] = error is not None
    failed = failed.to(comm_device(group))
    dist.all_reduce(failed, group=group)
    ranks = failed.cpu().nonzero().flatten().tolist()
    if ranks:
        message = f"{what} raised on rank(s) {ranks}"
        if error is not None:
            raise RankFailed(f"{message}: {type(error).__name__}: {error}") from error
        raise RankFailed(f"{message}; see that rank's error")
    return result
