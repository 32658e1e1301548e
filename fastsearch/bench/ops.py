"""Op benchmark cases: each fastsearch op against diffusers, eager PyTorch and ``torch.compile``."""

from __future__ import annotations

import torch

import fastsearch
from fastsearch.bench.harness import Case, compile_or_none, fastsearch_backends
from fastsearch.ops import score as score_ops
from fastsearch.ops import steps as step_ops


def _ddim_cases(shape, dtype, device) -> list[Case]:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(50)
    t = int(scheduler.timesteps[10])
    alpha = float(scheduler.alphas_cumprod[t])
    alpha_prev = float(scheduler.alphas_cumprod[t - scheduler.config.num_train_timesteps // 50])
    x = torch.randn(shape, dtype=dtype, device=device)
    eps = torch.randn(shape, dtype=dtype, device=device)
    nbytes = x.numel() * x.element_size()
    cases = []
    for eta in (0.0, 1.0):
        case = Case("ddim_step", f"eta={eta:g}" + (" seed" if eta else ""), shape, dtype, 4 * nbytes)

        def eager(eta=eta):
            noise = torch.randn_like(x) if eta > 0 else None
            return step_ops._ddim_step_reference(x, eps, None, alpha, None, alpha_prev, eta, noise, None, 0, None,
                                                 False)

        for name in fastsearch_backends(device):
            case.impls[f"fastsearch-{name}"] = (
                lambda name=name, eta=eta: fastsearch.ddim_step(x, eps, alpha, alpha_prev, eta=eta,
                                                                seed=1 if eta else None, backend=name))
        case.impls["diffusers"] = lambda eta=eta: scheduler.step(eps, t, x, eta=eta, return_dict=False)
        if not eta:
            # The memory floor of any two-in, two-out step: copies of the same bytes into ready outputs.
            outputs = (torch.empty_like(x), torch.empty_like(x))
            case.impls["copy-same-bytes"] = lambda outputs=outputs: (outputs[0].copy_(x), outputs[1].copy_(eps))
        case.impls["eager"] = eager
        compiled = compile_or_none(eager)
        if compiled is not None:
            case.impls["compile"] = compiled
        cases.append(case)
    return cases


def _flow_cases(shape, dtype, device) -> list[Case]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(50)
    t = scheduler.timesteps[10]
    sigma, sigma_next = float(scheduler.sigmas[10]), float(scheduler.sigmas[11])
    x = torch.randn(shape, dtype=dtype, device=device)
    v = torch.randn(shape, dtype=dtype, device=device)
    nbytes = x.numel() * x.element_size()
    case = Case("flow_euler_step", "euler", shape, dtype, 3 * nbytes)

    def diffusers_step():
        scheduler._step_index = 10  # the scheduler advances its own index on every call
        return scheduler.step(v, t, x, return_dict=False)

    def eager():
        return step_ops._flow_euler_step_reference(x, v, None, sigma, None, sigma_next, None, None, False)

    for name in fastsearch_backends(device):
        case.impls[f"fastsearch-{name}"] = lambda name=name: fastsearch.flow_euler_step(x, v, sigma, sigma_next,
                                                                                        backend=name)
    case.impls["diffusers"] = diffusers_step
    case.impls["eager"] = eager
    compiled = compile_or_none(eager)
    if compiled is not None:
        case.impls["compile"] = compiled
    return [case]


def _per_sample_cases(shape, dtype, device) -> list[Case]:
    """Steps that diffusers cannot express: per-sample levels (search over paths, particles)."""
    x = torch.randn(shape, dtype=dtype, device=device)
    v = torch.randn(shape, dtype=dtype, device=device)
    v2 = torch.randn(shape, dtype=dtype, device=device)
    batch = shape[0]
    sigma = torch.linspace(0.3, 0.8, batch, device=device)
    sigma_next = sigma - 0.02
    level_to = sigma + 0.1
    nbytes = x.numel() * x.element_size()
    heun = Case("flow_heun_step", "per-sample sigma", shape, dtype, 4 * nbytes)
    renoise = Case("renoise", "flow per-sample seed", shape, dtype, 2 * nbytes)

    def heun_eager():
        return step_ops._flow_heun_step_reference(x, v, v2, sigma, 0.0, sigma_next, 0.0)

    def renoise_eager():
        return step_ops._renoise_reference(x, sigma, 0.0, level_to, 0.0, 1, torch.randn_like(x), None)

    for name in fastsearch_backends(device):
        heun.impls[f"fastsearch-{name}"] = (
            lambda name=name: fastsearch.flow_heun_step(x, v, v2, sigma, sigma_next, backend=name))
        renoise.impls[f"fastsearch-{name}"] = (
            lambda name=name: fastsearch.renoise(x, sigma, level_to, schedule="flow", seed=3, backend=name))
    for case, eager in ((heun, heun_eager), (renoise, renoise_eager)):
        case.impls["eager"] = eager
        compiled = compile_or_none(eager)
        if compiled is not None:
            case.impls["compile"] = compiled
    return [heun, renoise]


def _noise_cases(shape, dtype, device) -> list[Case]:
    numel = 1
    for size in shape:
        numel *= size
    randn = Case("randn", "philox", shape, dtype, numel * torch.tensor([], dtype=dtype).element_size())
    for name in fastsearch_backends(device):
        randn.impls[f"fastsearch-{name}"] = (
            lambda name=name: fastsearch.randn(shape, seed=5, dtype=dtype, device=device, backend=name))
    randn.impls["eager"] = lambda: torch.randn(shape, dtype=dtype, device=device)
    return [randn]


def overhead_cases(device) -> list[Case]:
    """Per-call cost on a tiny tensor: the public function against the bare dispatcher call."""
    if not fastsearch_backends(device):
        return []
    x = torch.randn(1, 5, device=device)
    eps = torch.randn(1, 5, device=device)
    op = torch.ops.fastsearch.ddim_step.default
    case = Case("ddim_step", "call overhead", (1, 5), torch.float32, 4 * x.numel() * 4)
    case.impls["fastsearch-public"] = lambda: fastsearch.ddim_step(x, eps, 0.5, 0.6)
    case.impls["torch.ops-direct"] = lambda: op(x, eps, None, 0.5, None, 0.6, 0.0, None, None, 0, None, False)
    return [case]


def _select_cases(shape, dtype, device) -> list[Case]:
    """Beam pruning and resampling: 64 groups of ~64 candidates on a CPU, 512 x 256 on a GPU (the step
    shape does not apply)."""
    import numpy as np

    groups, width = (512, 256) if device.type == "cuda" else (64, 64)
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(width // 2, width + width // 2, (groups,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]).to(device)
    total = int(sizes.sum())
    scores = torch.rand(total, generator=g).to(device)
    finished = (torch.rand(total, generator=g) < 0.1).to(device)
    lengths = torch.randint(10, 200, (total,), generator=g).to(device)
    k, beams, penalty = 4, 16, 0.5
    cpu_offsets = offsets.cpu().tolist()
    # The dense layout a user pads to for the torch composite (padding is -inf and "finished").
    column = torch.arange(int(sizes.max()), device=device)
    inside = column < sizes.to(device)[:, None]
    flat = (offsets[:-1, None] + column).clamp(max=total - 1)
    dense_scores = torch.where(inside, scores[flat], torch.full((), -torch.inf, device=device))
    dense_finished = ~inside | finished[flat]
    dense_lengths = lengths[flat]
    nbytes = total * (4 + 1 + 8)
    case = Case("beam_prune", f"{groups} ragged groups ~{width}", (total,), torch.float32, nbytes)

    def composite():
        adjusted = torch.where(dense_finished, torch.full((), -torch.inf, device=device),
                               dense_scores / dense_lengths.float() ** penalty)
        values, index = torch.topk(adjusted, k, dim=-1)
        counts = (values > -torch.inf).sum(-1)
        slot = torch.arange(beams, device=device)
        return index.gather(-1, slot % counts.clamp(min=1)[:, None]), values, counts

    def per_group_loop():
        out = []
        for start, end in zip(cpu_offsets[:-1], cpu_offsets[1:], strict=True):
            adjusted = torch.where(finished[start:end], torch.full((), -torch.inf, device=device),
                                   scores[start:end] / lengths[start:end].float() ** penalty)
            values, index = torch.topk(adjusted, min(k, end - start))
            alive = index[values > -torch.inf] + start
            out.append(alive.repeat(beams // max(len(alive), 1) + 1)[:beams])
        return out

    np_scores, np_finished, np_lengths = scores.cpu().numpy(), finished.cpu().numpy(), lengths.cpu().numpy()

    def numpy_argsort():
        out = []
        for start, end in zip(cpu_offsets[:-1], cpu_offsets[1:], strict=True):
            adjusted = np.where(np_finished[start:end], -np.inf,
                                np_scores[start:end] / np_lengths[start:end] ** penalty)
            out.append(np.argsort(-adjusted, kind="stable")[:k] + start)
        return out

    for name in fastsearch_backends(device):
        case.impls[f"fastsearch-{name}"] = (
            lambda name=name: fastsearch.beam_prune(scores, k, offsets=offsets, finished=finished, lengths=lengths,
                                                    length_penalty=penalty, refill_to=beams, backend=name))
    case.impls["eager"] = composite
    compiled = compile_or_none(composite)
    if compiled is not None:
        case.impls["compile"] = compiled
    case.impls["torch-loop"] = per_group_loop
    case.impls["numpy-argsort"] = numpy_argsort

    log_weights = torch.randn(groups, width, generator=g).to(device)
    particles = width
    resample = Case("resample", f"systematic {groups}x{width}", (groups, width), torch.float32, groups * width * 12)
    for name in fastsearch_backends(device):
        resample.impls[f"fastsearch-{name}"] = (
            lambda name=name: fastsearch.resample(log_weights, particles, method="systematic", seed=1, backend=name))
    resample.impls["eager"] = lambda: torch.multinomial(torch.softmax(log_weights, -1), particles, replacement=True)
    return [case, resample]


def _score_cases(shape, dtype, device) -> list[Case]:
    """PRM scoring against the full-logits path today's PRM code runs: hidden @ lm_head.T over the whole
    vocabulary, two columns at the step tags, softmax, aggregation in Python. The step shape does not apply:
    T=2048, H=1024, V=32000, S=256, N=64 on a CPU; T=32768, H=4096, V=152064, S=4096, N=512 on a GPU."""
    tokens, hidden, vocab, steps, candidates = ((32768, 4096, 152064, 4096, 512) if device.type == "cuda"
                                                else (2048, 1024, 32000, 256, 64))
    g = torch.Generator().manual_seed(0)
    hidden_states = torch.randn(tokens, hidden, generator=g).to(dtype).to(device)
    lm_head = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(dtype).to(device)
    good, bad = 7, 11
    head = lm_head[[good, bad]].contiguous()
    positions = torch.sort(torch.randperm(tokens, generator=g)[:steps]).values.to(device)
    cuts = torch.sort(torch.randperm(steps - 1, generator=g)[:candidates - 1] + 1).values
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.tensor([steps])]).to(device)
    cpu_offsets = offsets.cpu().tolist()
    bytes_moved = steps * hidden * hidden_states.element_size() + head.numel() * head.element_size()
    case = Case("prm_scores", f"T{tokens} H{hidden} V{vocab} S{steps} N{candidates}", (tokens, hidden), dtype,
                bytes_moved, measure_memory=True)

    def full_logits():
        logits = hidden_states @ lm_head.T  # [T, V]
        step_scores = torch.softmax(logits[positions][:, [good, bad]].float(), dim=-1)[:, 0]
        return [step_scores[start:end][-1] for start, end in zip(cpu_offsets[:-1], cpu_offsets[1:], strict=True)]

    def gather_eager():
        return score_ops._prm_scores_reference(hidden_states, positions, offsets, head, None, 0, 0, 0, None)

    for name in fastsearch_backends(device, "prm_scores"):
        case.impls[f"fastsearch-{name}"] = (
            lambda name=name: fastsearch.prm_scores(hidden_states, positions, head, offsets=offsets, backend=name))
    case.impls["eager"] = full_logits
    case.impls["gather-eager"] = gather_eager
    return [case]


FAMILIES = {
    "ddim_step": _ddim_cases,
    "flow_euler_step": _flow_cases,
    "per_sample": _per_sample_cases,
    "randn": _noise_cases,
    "select": _select_cases,
    "score": _score_cases,
}
