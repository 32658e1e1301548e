"""fastsearch.distributed against the single-process ops: 2 and 3 gloo ranks on the CPU.

Every rank builds the same global candidates from a seed, keeps its shard, runs the distributed op and compares
it with the single-process op on the whole list. One spawn per world size runs every case (a spawn costs
seconds of imports on a 2-core machine); a failed assertion in any rank fails the test with its traceback.
"""

from __future__ import annotations

import os
import queue as queue_module
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastsearch
import fastsearch.distributed as fd

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _worker(rank: int, world_size: int, store_path: str, jobs, results) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    while (job := jobs.get()) is not None:
        body, args = job
        try:
            body(rank, world_size, *args)
            results.put((rank, None))
        except BaseException:  # noqa: BLE001 - sent to the test, which fails with it
            results.put((rank, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    """``world_size`` spawned gloo ranks that run job after job (spawning costs seconds of imports a rank)."""

    def __init__(self, world_size: int, store_path: str):
        root = os.path.dirname(os.path.dirname(os.path.abspath(fastsearch.__file__)))
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
        os.environ["PYTHONPATH"] = os.pathsep.join([root] + paths)  # the ranks import this checkout
        context = mp.get_context("spawn")
        self.world_size = world_size
        self.results = context.Queue()
        self.jobs = [context.Queue() for _ in range(world_size)]
        self.ranks = [context.Process(target=_worker, args=(rank, world_size, store_path, self.jobs[rank],
                                                            self.results), daemon=True)
                      for rank in range(world_size)]
        for process in self.ranks:
            process.start()

    def run(self, body, *args, timeout: float = 120.0) -> None:
        """Run ``body(rank, world_size, *args)`` on every rank; raise with the tracebacks of the ranks that failed."""
        for queue in self.jobs:
            queue.put((body, args))
        failures = []
        for _ in range(self.world_size):
            try:
                rank, error = self.results.get(timeout=timeout)
            except queue_module.Empty:
                self.close(force=True)
                raise AssertionError(f"a rank did not finish {body.__name__} within {timeout} s") from None
            if error is not None:
                failures.append(f"rank {rank}:\n{error}")
        if failures:
            raise AssertionError("\n".join(failures))

    def close(self, force: bool = False) -> None:
        for process, queue in zip(self.ranks, self.jobs, strict=True):
            if force:
                process.kill()
            else:
                queue.put(None)
        for process in self.ranks:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """``ranks(world_size)``: the module's pool of that many gloo ranks, started on first use."""
    pools = {}

    def get(world_size: int) -> RankPool:
        if world_size not in pools:
            pools[world_size] = RankPool(world_size, str(tmp_path_factory.mktemp("store") / "store"))
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()


# -- building shards ----------------------------------------------------------------------------------------------


def _split(sizes: torch.Tensor, values: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s flat shard of a global flat list whose groups are split as ``sizes`` [W, G]; with its
    local offsets."""
    group_sizes = sizes.sum(0)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), group_sizes.cumsum(0)])
    starts = sizes.cumsum(0) - sizes
    parts = [values[offsets[g] + starts[rank, g]: offsets[g] + starts[rank, g] + sizes[rank, g]]
             for g in range(sizes.shape[1])]
    local_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes[rank].cumsum(0)])
    return torch.cat(parts), local_offsets


def _scores(generator, count: int, dtype=torch.float32, ties: bool = True, nan: bool = True) -> torch.Tensor:
    """Scores with many ties (a few distinct values), some NaN, -inf and +inf."""
    if ties:
        scores = torch.randint(0, 4, (count,), generator=generator).float() / 4
    else:
        scores = torch.randn(count, generator=generator)
    special = torch.rand(count, generator=generator)
    if nan:
        scores[special < 0.1] = float("nan")
    scores[(special >= 0.1) & (special < 0.15)] = -float("inf")
    scores[(special >= 0.15) & (special < 0.18)] = float("inf")
    return scores.to(dtype)


def _layouts(world_size: int) -> list[torch.Tensor]:
    """[W, G] splits: uneven, with empty shards and an empty group."""
    if world_size == 2:
        return [torch.tensor([[3, 0, 2, 5], [4, 6, 0, 1]]), torch.tensor([[0, 0], [7, 3]]),
                torch.tensor([[1, 2, 0], [1, 0, 0]])]
    return [torch.tensor([[2, 0, 3, 1], [0, 5, 1, 1], [4, 2, 0, 1]]), torch.tensor([[0, 6], [0, 0], [5, 2]]),
            torch.tensor([[1, 0, 0], [0, 0, 0], [2, 3, 0]])]


def _equal(got, want, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {list(got.shape)} != {list(want.shape)}"
    assert torch.equal(got, want) or torch.allclose(got, want, equal_nan=True, rtol=0, atol=0), \
        f"{what}:\n{got}\n!=\n{want}"


# -- the cases ----------------------------------------------------------------------------------------------------


def _topk_cases(rank: int, world_size: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for case, sizes in enumerate(_layouts(world_size)):
        total = int(sizes.sum())
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.sum(0).cumsum(0)])
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            scores = _scores(generator, total, dtype)
            mask = torch.rand(total, generator=generator) > 0.2
            local, local_offsets = _split(sizes, scores, rank)
            local_mask, _ = _split(sizes, mask, rank)
            for k in (1, 3, 9):
                for largest in (True, False):
                    got = fd.segmented_topk(local, k, offsets=local_offsets, mask=local_mask, largest=largest)
                    want = fastsearch.segmented_topk(scores, k, offsets=offsets, mask=mask, largest=largest)
                    _equal(got.indices, want.indices, f"topk indices case {case} {dtype} k={k} {largest}")
                    _equal(got.values, want.values, f"topk values case {case} {dtype} k={k} {largest}")
    # dense shards of uneven width (one rank may hold no column), and one 1-D group
    widths = [3, 0, 4][:world_size] if world_size == 3 else [2, 5]
    dense = _scores(generator, 5 * sum(widths)).view(5, sum(widths))
    start = sum(widths[:rank])
    got = fd.segmented_topk(dense[:, start:start + widths[rank]], 4)
    want = fastsearch.segmented_topk(dense, 4)
    _equal(got.indices, want.indices, "dense topk indices")
    _equal(got.values, want.values, "dense topk values")
    line = dense[0]
    got = fd.segmented_topk(line[start:start + widths[rank]], 2)
    _equal(got.indices, fastsearch.segmented_topk(line, 2).indices, "1-D topk indices")


def _beam_cases(rank: int, world_size: int) -> None:
    generator = torch.Generator().manual_seed(2)
    for case, sizes in enumerate(_layouts(world_size)):
        total = int(sizes.sum())
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.sum(0).cumsum(0)])
        scores = _scores(generator, total)
        finished = torch.rand(total, generator=generator) < 0.15
        lengths = torch.randint(1, 5, (total,), generator=generator)
        keys = torch.randint(0, 3, (total,), generator=generator)  # few keys: duplicates across ranks
        shard = {name: _split(sizes, value, rank)[0]
                 for name, value in (("scores", scores), ("finished", finished), ("lengths", lengths), ("keys", keys))}
        local_offsets = _split(sizes, scores, rank)[1]
        for k, refill, penalty, dedup in ((1, 3, 0.0, False), (2, 5, 1.0, True), (4, 0, 0.5, True),
                                          (6, 7, 0.0, False), (3, None, 0.0, True)):
            got = fd.beam_prune(shard["scores"], k, offsets=local_offsets, finished=shard["finished"],
                                lengths=shard["lengths"], length_penalty=penalty,
                                dedup_keys=shard["keys"] if dedup else None, refill_to=refill)
            want = fastsearch.beam_prune(scores, k, offsets=offsets, finished=finished, lengths=lengths,
                                         length_penalty=penalty, dedup_keys=keys if dedup else None, refill_to=refill)
            for field in ("indices", "values", "counts") + (() if refill is None else ("parents",)):
                _equal(getattr(got, field), getattr(want, field), f"beam {field} case {case} k={k} dedup={dedup}")
            assert (got.parents is None) == (refill is None)
    # dense shards (one rank may hold no column) and one 1-D group, float64
    widths = [3, 0, 4][:world_size] if world_size == 3 else [2, 5]
    dense = _scores(generator, 4 * sum(widths), torch.float64).view(4, sum(widths))
    keys = torch.randint(0, 3, dense.shape, generator=generator)
    start = sum(widths[:rank])
    mine = slice(start, start + widths[rank])
    got = fd.beam_prune(dense[:, mine], 2, dedup_keys=keys[:, mine], refill_to=5)
    want = fastsearch.beam_prune(dense, 2, dedup_keys=keys, refill_to=5)
    for field in ("indices", "values", "counts", "parents"):
        _equal(getattr(got, field), getattr(want, field), f"dense beam {field}")
    got = fd.beam_prune(dense[0, mine], 3, refill_to=4)
    want = fastsearch.beam_prune(dense[0], 3, refill_to=4)
    for field in ("indices", "values", "counts", "parents"):
        _equal(getattr(got, field), getattr(want, field), f"1-D beam {field}")


def _vote_cases(rank: int, world_size: int) -> None:
    generator = torch.Generator().manual_seed(3)
    for case, sizes in enumerate(_layouts(world_size)):
        total = int(sizes.sum())
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.sum(0).cumsum(0)])
        keys = torch.randint(0, 3, (total,), generator=generator)
        scores = _scores(generator, total, nan=True).clamp(-4, 4)  # quarters: sums are exact in any order
        mask = torch.rand(total, generator=generator) > 0.1
        local_offsets = _split(sizes, keys, rank)[1]
        for method in ("majority", "weighted", "max"):
            got = fd.vote(_split(sizes, keys, rank)[0], _split(sizes, scores, rank)[0], offsets=local_offsets,
                          method=method, mask=_split(sizes, mask, rank)[0])
            want = fastsearch.vote(keys, scores, offsets=offsets, method=method, mask=mask)
            _equal(got, want, f"vote {method} case {case}")
    # dense shards and one 1-D group: row-local winners
    widths = [3, 0, 4][:world_size] if world_size == 3 else [2, 5]
    keys = torch.randint(0, 3, (4, sum(widths)), generator=generator)
    scores = _scores(generator, keys.numel()).view(keys.shape).clamp(-4, 4)
    mine = slice(sum(widths[:rank]), sum(widths[:rank + 1]))
    for method in ("majority", "weighted", "max"):
        _equal(fd.vote(keys[:, mine], scores[:, mine], method=method),
               fastsearch.vote(keys, scores, method=method), f"dense vote {method}")
        _equal(fd.vote(keys[1, mine], scores[1, mine], method=method),
               fastsearch.vote(keys[1], scores[1], method=method), f"1-D vote {method}")


def _particle_cases(rank: int, world_size: int) -> None:
    generator = torch.Generator().manual_seed(4)
    for case, sizes in enumerate(_layouts(world_size)):
        alive = sizes.sum(0) > 0
        sizes = sizes[:, alive]  # resample refuses an empty group
        total = int(sizes.sum())
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.sum(0).cumsum(0)])
        log_weights = torch.randn(total, generator=generator) * 3
        local, local_offsets = _split(sizes, log_weights, rank)
        _equal(fd.effective_sample_size(local, offsets=local_offsets),
               fastsearch.effective_sample_size(log_weights, offsets=offsets), f"ess case {case}")
        for method in ("multinomial", "systematic", "stratified", "residual"):
            got = fd.resample(local, 6, offsets=local_offsets, method=method, seed=11 + case)
            want = fastsearch.resample(log_weights, 6, offsets=offsets, method=method, seed=11 + case)
            _equal(got, want, f"resample {method} case {case}")
        # every particle's state is its global index: after the exchange a rank holds its slots' ancestors
        states = torch.arange(total, dtype=torch.float32)[:, None].repeat(1, 3)
        moved = fd.exchange_rows(_split(sizes, states, rank)[0], want, fd.Shards(sizes))
        slots = want.numel()
        mine = slice(slots * rank // world_size, slots * (rank + 1) // world_size)
        _equal(moved, states[want.flatten()[mine]], f"exchange case {case}")
    # all the weight on the last rank: the others hold -inf
    width = 4
    log_weights = torch.full((2, width * world_size), -float("inf"))
    log_weights[:, -width:] = torch.randn(2, width, generator=generator)
    local = log_weights[:, rank * width:(rank + 1) * width]
    want = fastsearch.resample(log_weights, 8, seed=5)
    _equal(fd.resample(local, 8, seed=5), want, "resample with the weight on one rank")
    _equal(fd.effective_sample_size(local), fastsearch.effective_sample_size(log_weights), "ess on one rank")
    assert bool((want % (width * world_size) >= width * (world_size - 1)).all())
    states = torch.arange(2 * width * world_size, dtype=torch.float32)
    source = fd.Shards(torch.full((world_size, 2), width))
    flat_local = states.view(2, -1)[:, rank * width:(rank + 1) * width].reshape(-1)
    moved = fd.exchange_rows(flat_local, want, source)
    share = slice(16 * rank // world_size, 16 * (rank + 1) // world_size)
    _equal(moved, states[want.flatten()[share]], "exchange from one rank")


def _all_cases(rank: int, world_size: int) -> None:
    _topk_cases(rank, world_size)
    _beam_cases(rank, world_size)
    _vote_cases(rank, world_size)
    _particle_cases(rank, world_size)


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_ops_equal_the_single_process_ops(ranks, world_size):
    ranks(world_size).run(_all_cases)


def _planted_failure(rank: int, world_size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 6, generator=generator)
    # a wrong answer on one rank must fail the comparison (the harness really compares)
    local = scores[:, rank * 3:(rank + 1) * 3] + (1.0 if rank == 1 else 0.0)
    got = fd.segmented_topk(local, 2)
    _equal(got.values, fastsearch.segmented_topk(scores, 2).values, "planted")


def test_the_harness_reports_a_rank_failure(ranks):
    with pytest.raises(AssertionError, match="rank 1:(.|\\n)*planted"):
        ranks(2).run(_planted_failure)


def _faults(rank: int, world_size: int) -> None:
    with pytest.raises(ValueError, match="disagree on seed"):
        fd.check_same_arguments("search", {"n": 4, "seed": rank}, None)
    fd.check_same_arguments("search", {"n": 4, "seed": 1}, None)

    def verifier():
        if rank == world_size - 1:
            raise RuntimeError("verifier exploded")
        return 1

    with pytest.raises(fd.RankFailed, match=rf"verifier raised on rank\(s\) \[{world_size - 1}\]"):
        fd.run_guarded("verifier", verifier, None)
    assert fd.run_guarded("verifier", lambda: 7, None) == 7


def test_faults_are_named_on_every_rank(ranks):
    ranks(3).run(_faults)


def test_group_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(ValueError, match="init_process_group"):
        fd.segmented_topk(torch.zeros(2, 3), 1)
