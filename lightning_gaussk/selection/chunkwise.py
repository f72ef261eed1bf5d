"""Chunk-wise exact top-k: exactly ``kc`` entries of every chunk of ``C`` entries.

For ``u`` of ``n * C`` entries viewed as ``n`` rows of ``C``::

    I_j = argtopk_kc |u[j C : (j + 1) C]|        (exact, per chunk j)
    indices = concat_j (j C + I_j)                  (chunk by chunk: entry i in chunk i // kc)
    values  = u[indices]

A fixed number per chunk (rather than the ``n kc`` largest of the whole tensor) bounds what any
chunk sends, gives the quantised exchange one scale per chunk, and costs one ``topk`` over a
``(n, C)`` grid. :class:`ChunkwiseTopK` allocates its buffers once, for one ``(n, C, kc)``; every
call writes into them (no per-call allocation), so its results are views that the next call
overwrites.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ChunkwiseTopK"]


class ChunkwiseTopK:
    """Exact top-``kc`` of ``|u|`` in each of ``n_chunks`` chunks of ``chunk`` entries.

    Args:
        n_chunks: ``n``, the chunks of ``u`` (``u`` has ``n * chunk`` entries).
        chunk: ``C``, entries per chunk.
        per_chunk: ``kc``, entries selected per chunk, in ``[1, C]``.
        device: where ``u`` lives (the buffers are allocated there, once).

    Raises:
        ValueError: naming the argument, for sizes out of range.

    Example::

        top = ChunkwiseTopK(n_chunks=4, chunk=1024, per_chunk=20, device=u.device)
        values, indices = top(u)        # 80 entries: 20 of each chunk, chunk by chunk
    """

    def __init__(self, n_chunks: int, chunk: int, per_chunk: int, device: torch.device | str = "cpu") -> None:
        for name, value in (("n_chunks", n_chunks), ("chunk", chunk), ("per_chunk", per_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ChunkwiseTopK: `{name}` must be an int >= 1, got {value!r}")
        if per_chunk > chunk:
            raise ValueError(f"ChunkwiseTopK: `per_chunk` must be at most `chunk` = {chunk}, got {per_chunk!r}")
        n, C, kc = n_chunks, chunk, per_chunk
        self.n_chunks, self.chunk, self.per_chunk = n, C, kc
        self._abs = torch.empty(n, C, dtype=torch.float32, device=device)
        self._top_abs = torch.empty(n, kc, dtype=torch.float32, device=device)
        self._top_at = torch.empty(n, kc, dtype=torch.int64, device=device)  # position inside the chunk
        self._values = torch.empty(n * kc, dtype=torch.float32, device=device)
        self._base = torch.arange(n, device=device).mul_(C).unsqueeze(1)  # first entry of each chunk
        self._indices = torch.empty(n, kc, dtype=torch.int64, device=device)

    @property
    def k(self) -> int:
        """Entries selected per call, ``n * kc``."""
        return self.n_chunks * self.per_chunk

    def __call__(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """``(values, indices)`` of the selection from ``u`` (fp32, ``n * C`` entries): ``k``
        values (fp32) and int64 indices into ``u``, chunk by chunk (in-chunk order unspecified).
        Both are this object's buffers, overwritten by the next call."""
        grid = u.view(self.n_chunks, self.chunk)
        torch.abs(grid, out=self._abs)
        torch.topk(self._abs, self.per_chunk, dim=1, sorted=False, out=(self._top_abs, self._top_at))
        torch.gather(grid, 1, self._top_at, out=self._values.view(self.n_chunks, self.per_chunk))
        torch.add(self._top_at, self._base, out=self._indices)
        return self._values, self._indices.view(-1)
