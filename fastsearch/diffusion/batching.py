"""Calling a model or a verifier on a batch of rows: conditioning that follows the rows, chunking, NFE counting.

Conditioning rule:
    A tensor in the conditioning whose first dimension equals the batch size is per-row: when a subset of the
    rows (or a chunk of ``batch_size`` rows) is evaluated, the same rows of that tensor are passed. Anything else
    (non-tensors, 0-d tensors, tensors with another first dimension) is passed unchanged to every call. A shared
    tensor that happens to have as many rows as the batch would be split: pass it through a closure instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fastsearch.checks import check_callable


class Conditioning:
    """Keyword conditioning that follows the rows of a batch (the rule in this module's docstring).

    Args:
        cond: the keyword arguments.
        size: a tensor whose first dimension equals ``size`` is per-row.
        index: optional int64 [B] tensor mapping each batch row to its row of the per-row tensors (e.g. the
            prompt of each candidate); None when batch row ``r`` is per-row tensor row ``r``.
    """

    def __init__(self, cond: dict, size: int, index: torch.Tensor | None = None):
        self.shared = {}
        self.per_row = {}
        for name, value in cond.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
                self.per_row[name] = value
            else:
                self.shared[name] = value
        self.index = index

    def take(self, rows: slice | torch.Tensor) -> dict:
        """The conditioning of batch rows ``rows`` (a slice, or an int64 tensor on the per-row tensors' device)."""
        if not self.per_row:
            return self.shared
        if self.index is not None:
            rows = self.index[rows]
        elif isinstance(rows, slice) and rows == slice(None):
            return {**self.shared, **self.per_row}
        taken = {name: value[rows] if isinstance(rows, slice) else value.index_select(0, rows.to(value.device))
                 for name, value in self.per_row.items()}
        return {**self.shared, **taken}


def call_in_chunks(fn: Callable, inputs: Sequence[torch.Tensor], cond: Conditioning, rows: slice | torch.Tensor,
                   batch_size: int | None, check: Callable[[object, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(*inputs, **cond)`` over chunks of at most ``batch_size`` rows, concatenated.

    ``rows`` names the batch rows of ``inputs`` for the conditioning: ``slice(None)`` (row r is batch row r) or an
    int64 index tensor. ``check(output, first_input_chunk)`` validates one chunk's output and returns it as a tensor.
    """
    count = inputs[0].shape[0]
    if batch_size is None or count <= batch_size:
        return check(fn(*inputs, **cond.take(rows)), inputs[0])
    outputs = []
    for begin in range(0, count, batch_size):
        end = min(begin + batch_size, count)
        chunk_rows = slice(begin, end) if isinstance(rows, slice) else rows[begin:end]
        chunk = [value[begin:end] for value in inputs]
        outputs.append(check(fn(*chunk, **cond.take(chunk_rows)), chunk[0]))
    return torch.cat(outputs)


def _check_model_output(output, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"model must return a tensor, got {type(output).__name__}")
    if output.shape != x.shape:
        raise ValueError(f"model returned shape {list(output.shape)} for samples of shape {list(x.shape)}; a denoiser "
                         "returns one output like x per sample")
    return output.to(x.dtype)


class ModelCall:
    """A denoiser with its conditioning and chunking: what :meth:`Sampler.run` evaluates.

    Calling it evaluates ``model(x, level, **cond)`` on rows ``x`` (batch rows ``rows`` of the conditioning), in
    chunks of at most ``batch_size`` rows, counts one NFE per row in ``nfe`` and reports each call's rows to
    ``on_nfe`` (a progress bar's ``update``, say).
    """

    def __init__(self, model: Callable, cond: Conditioning, batch_size: int | None,
                 on_nfe: Callable[[int], object] | None = None):
        self.model = check_callable("model", model)
        self.cond = cond
        self.batch_size = batch_size
        self.on_nfe = on_nfe
        self.nfe = 0

    def __call__(self, x: torch.Tensor, level: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
        try:
            out = call_in_chunks(self.model, (x, level), self.cond, rows, self.batch_size, _check_model_output)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"the model rejected a batch of samples of shape {list(x.shape[1:])} (check the sample "
                             f"shape): {err}") from err
        self.nfe += x.shape[0]
        if self.on_nfe is not None:
            self.on_nfe(x.shape[0])
        return out
