"""Chunk-wise quantised selections: 2- or 8-bit values with one fp32 scale per chunk, and the
all-gather that carries them (:class:`QuantAllGather`).

A chunk-wise selection takes exactly ``kc`` entries from each of ``n`` chunks of ``C`` entries
(``d = n C``), in chunk order: entry ``i`` of the selection lies in chunk ``i // kc``, at offset
``o_i < C`` in it. Each chunk's ``kc`` values ``v`` are quantised to ``b`` bits over the chunk's
scale ``m = max |v|``, with ``L = 2^b`` symmetric levels::

    level(j) = m (2j - (L - 1)) / (L - 1),       j = round(((L - 1) v / m + (L - 1)) / 2) in [0, L - 1]

(2 bits: ``{-m, -m/3, m/3, m}``; a chunk whose values are all 0 decodes to 0). The message of a
rank, in ONE uint8 tensor whose size is fixed by ``(n, kc, b)``::

    [codes: ceil(n kc b / 8) bytes, b-bit codes packed little-endian, padded to 4 bytes
     | offsets: int16 per entry (o_i < C <= 32768), padded to 4 bytes
     | scales: n fp32 | flag: 1 fp32]

so a selected entry costs ``b / 8 + 2`` bytes and a chunk 4 more, against 8 bytes (fp32 value,
int32 index) in :class:`~lightning_gaussk.comm.exchange.AllGather`. The exchange replaces the
selection's values by their dequantised form (what every peer decodes), so the driver's commit
``residual = u - sent`` puts the quantisation error back into the residual.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gaussk.comm.exchange import Delivery, Exchange, Launched, Route, Selection, all_gather, buffer

__all__ = ["BITS", "MAX_CHUNK", "QuantAllGather", "dequantize", "message_bytes", "pack_codes", "quantize", "unpack_codes"]

BITS = (2, 8)  #: supported code widths
MAX_CHUNK = 1 << 15  #: largest chunk: offsets travel as int16


def _round4(n: int) -> int:
    return -(-n // 4) * 4


def _sizes(n: int, kc: int, bits: int) -> tuple[int, int, int]:
    """Byte sizes of the codes and offsets regions (each padded to 4) and the whole message."""
    codes = _round4(-(-n * kc * bits // 8))
    offsets = _round4(2 * n * kc)
    return codes, offsets, codes + offsets + 4 * n + 4


def message_bytes(n: int, kc: int, bits: int) -> int:
    """Bytes of one rank's message for ``n`` chunks of ``kc`` selected entries at ``bits`` bits."""
    return _sizes(n, kc, bits)[2]


def quantize(values: Tensor, bits: int, codes: Tensor, scales: Tensor, deq: Tensor) -> None:
    """Quantise ``values`` (``(n, kc)`` fp32) per row: ``codes`` (uint8, ``(n, kc)``), ``scales``
    (``(n,)``, the rows' ``max |v|``) and ``deq`` (``(n, kc)``, the dequantised values), all
    written in place (see the module docstring for the levels)."""
    h = float((1 << bits) - 1)
    torch.amax(values.abs(), dim=1, out=scales)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(1)
    j = values.div(safe).mul_(h).add_(h).mul_(0.5).round_().clamp_(0.0, h)
    codes.copy_(j)
    torch.mul(j.mul_(2.0).sub_(h).div_(h), scales.unsqueeze(1), out=deq)


def dequantize(codes: Tensor, scales: Tensor, bits: int) -> Tensor:
    """Values of ``codes`` (``(..., n, kc)`` uint8) at ``scales`` (``(..., n)``)."""
    h = float((1 << bits) - 1)
    return codes.to(torch.float32).mul_(2.0).sub_(h).div_(h).mul_(scales.unsqueeze(-1))


def pack_codes(codes: Tensor, bits: int, out: Tensor) -> None:
    """``codes`` (uint8 flat, values < 2^bits) packed ``8 / bits`` per byte into ``out`` (uint8),
    little-endian inside a byte (code ``i`` at bits ``b (i mod 8/b)``); the first
    ``ceil(k b / 8)`` bytes of ``out`` are written."""
    if bits == 8:
        out[: codes.numel()].copy_(codes)
        return
    per = 8 // bits
    k = codes.numel()
    full = k // per * per
    grid = codes[:full].view(-1, per).to(torch.int32)
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=codes.device)
    out[: full // per].copy_((grid << shifts).sum(1))
    if full < k:  # a last, partial byte
        tail = codes[full:].to(torch.int32) << shifts[: k - full]
        out[full // per : full // per + 1].copy_(tail.sum().reshape(1))


def unpack_codes(packed: Tensor, k: int, bits: int) -> Tensor:
    """The first ``k`` codes of each row of ``packed`` (``(R, bytes)`` uint8, as
    :func:`pack_codes` wrote them) -> ``(R, k)`` uint8."""
    if bits == 8:
        return packed[:, :k]
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device)
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)[:, :k].to(torch.uint8)


class QuantAllGather(Exchange):
    """All-gather of chunk-wise selections with ``bits``-bit values and one fp32 scale per chunk
    (module docstring). ``out = (1 / D) sum_r dequantised_r`` scattered at the selected indices;
    all of a selection is delivered, and ``sel.values`` is overwritten with its dequantised values
    (the sender's own view of what it sent). Traffic per rank: ``(P - 1)`` messages of
    :func:`message_bytes` bytes.

    Args:
        bits: 2 or 8.
        chunk: ``C``, entries per chunk (at most :data:`MAX_CHUNK`).
        per_chunk: ``kc``, entries selected per chunk; ``sel.indices`` must hold them chunk by
            chunk (entry ``i`` in chunk ``i // kc``).
    """

    name = "quant_allgather"

    def __init__(self, bits: int, chunk: int, per_chunk: int) -> None:
        if bits not in BITS:
            raise ValueError(f"QuantAllGather: `bits` must be one of {BITS}, got {bits!r}")
        if not 1 <= chunk <= MAX_CHUNK:
            raise ValueError(f"QuantAllGather: `chunk` must be in [1, {MAX_CHUNK}], got {chunk!r}")
        if not 1 <= per_chunk <= chunk:
            raise ValueError(f"QuantAllGather: `per_chunk` must be in [1, chunk], got {per_chunk!r}")
        self.bits, self.chunk, self.per_chunk = bits, chunk, per_chunk

    def launch(self, u: Tensor, sel: Selection | None, out: Tensor, route: Route, cache: dict[str, Tensor]) -> Launched:
        assert sel is not None
        kc, C, bits = self.per_chunk, self.chunk, self.bits
        n = sel.k // kc
        cb, ob, total = _sizes(n, kc, bits)
        dev = out.device
        values = sel.values.view(n, kc)
        codes = buffer(cache, "q_codes", n * kc, dev, torch.uint8)
        scales = buffer(cache, "q_scales", n, dev)
        deq = buffer(cache, "q_deq", n * kc, dev)
        quantize(values, bits, codes.view(n, kc), scales, deq.view(n, kc))
        sel.values.copy_(deq)  # what was sent, for the commit

        msg = buffer(cache, "q_msg", total, dev, torch.uint8)
        msg[:cb].zero_()
        pack_codes(codes, bits, msg[:cb])
        msg[cb : cb + ob].view(torch.int16)[: n * kc].copy_(sel.indices.remainder(C))
        tail = msg[cb + ob :].view(torch.float32)
        tail[:n].copy_(scales)
        tail[n].copy_(sel.flag)
        gathered = buffer(cache, "q_gathered", route.peers * total, dev, torch.uint8)
        work = all_gather(gathered, msg, group=route.group, async_op=True)

        def finish() -> Delivery:
            rows = gathered.view(route.peers, total)
            got_codes = unpack_codes(rows[:, :cb], n * kc, bits).view(route.peers, n, kc)
            offsets = rows[:, cb : cb + ob].contiguous().view(torch.int16)[:, : n * kc].to(torch.int64)
            tails = rows[:, cb + ob :].contiguous().view(torch.float32)
            vals = dequantize(got_codes, tails[:, :n], bits).reshape(-1)
            base = torch.arange(n, device=dev).repeat_interleave(kc).mul_(C)
            idx = (offsets + base).reshape(-1)
            out.index_add_(0, idx, vals, alpha=1.0 / route.divisor)
            return Delivery(tails[:, n].sum())

        return Launched(work, finish)

    def message_bytes(self, k: int, d: int, peers: int) -> int:
        return message_bytes(k // self.per_chunk, self.per_chunk, self.bits)

    def volume_bytes(self, k: int, d: int, peers: int) -> int:
        """The ``P`` gathered messages (so the wire carries ``P - 1`` of them)."""
        return self.message_bytes(k, d, peers) * peers
