"""The bounded sparse all-reduce: split, reduce, select, all-gather (Ok-Topk-like), fixed sizes.

``P`` peers (``route.peers`` in ``route.group``), each with ``u`` of ``d`` entries and a selection
of ``k`` of them (values, indices into ``u``, a flag).

**Regions (interleaved).** Entry ``g`` belongs to region ``j = g mod P`` at local position
``l = g // P``; region ``j`` holds ``n_j = ceil((d - j) / P)`` entries (``ceil(d/P)`` or
``floor(d/P)``, 0 when ``j >= d``), at most ``R = ceil(d/P)``. Interleaving spreads a bucket's
top-k evenly over the regions even when one layer (a contiguous block) dominates the bucket;
group rank ``j`` owns region ``j``.

**Stage 1: reduce-scatter of the selections** (one ``all_to_all_single``, equal splits). Each rank
packs its selected entries per destination region into a fixed ``(P, c1)`` layout,
``c1 = min(ceil(3k / 2P), R)`` (capacity factor 1.5): chunk ``j`` is the codec message
``[values c1 | int32 local positions c1 | flag]`` (``2 c1 + 1`` words). When more than ``c1``
selected entries fall in one region, the largest ``c1`` by magnitude are sent and the rest are
*not delivered* (they stay in the sender's residual). Unused slots are padding (value 0 at the
owner's trash position ``R``). The slots are found with fixed-size ops only (one stable sort of
``region << 31 | ~|value| bits``, ``searchsorted`` for region starts), so nothing reads a tensor
on the host.

**Reduce and select (the owner of region j).** It sums the ``P`` received chunks into a region
buffer of ``R + 1`` words (``index_add_``; slot ``R`` is the trash), sums the ``P`` flags, and
selects the exact top-``c2`` positions of the reduced region by magnitude,
``c2 = c1`` (so the update holds about ``1.5 k`` entries). Positions some rank sent rank above positions nobody sent (so a
selected value that is exactly 0 still wins over an untouched 0), and those above the positions
``l >= n_j`` past a short region's end, which are chosen only when ``c2 > n_j`` and then decode to
nothing.

**Stage 2: all-gather** of each owner's ``[values c2 | local positions c2 | flag sum]``. Every rank
decodes the ``P c2`` entries into ``out`` (global index ``l P + j``), scaled by ``1 / D``
(``D = route.divisor``), and the flag, the sum of the gathered flag sums (NaN if any rank's ``u``
was non-finite). A selected entry of this rank was *delivered* iff it was sent in stage 1 and its
global index is in the final set, so

    out = (1 / D) sum_r u_r[sel_r] * delivered_r

exactly (up to fp32 summation order), and the commit's ``residual = u - delivered`` is exact error
feedback. At ``k = d`` nothing is dropped (``c1 = c2 = R``) and ``out`` is the mean of ``u``; with
``P = 1`` every selected entry is delivered.

**Bytes per rank** (fp32 words of 4 bytes): this rank's messages are ``P (2 c1 + 1) + (2 c2 + 1)``
words (:meth:`SparseAllReduce.message_bytes`); on the wire it sends ``(P - 1)(2 c1 + 1)`` in stage 1
and ``(P - 1)(2 c2 + 1)`` in stage 2 (ring all-gather), so

    wire words = (P - 1)(2 c1 + 2 c2 + 2) <= 6 k (P - 1) / P + 6 (P - 1)

i.e. ``c = 6`` words per selected entry whatever ``P`` (Ok-Topk's bound), against
``(P - 1)(2k + 1)`` for the all-gather, which grows with ``P``.

**What density means.** For this exchange ``k = density * d`` bounds the entries in the global
update: at most ``P c2 ~= k`` entries. For the all-gather, ``k`` is the entries in each rank's
message, and the global update holds up to ``P k`` entries (the union of the selections).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gaussk.comm import codec
from lightning_gaussk.comm.exchange import Delivery, Exchange, Launched, Pricing, Route, Selection, all_gather, buffer

__all__ = ["SparseAllReduce", "bounded_chunks"]

_MAG_BITS = 31  # |fp32| bit patterns are < 2**31 and order like the magnitudes they encode
_UNTOUCHED = -0.5  # score of a region position nobody sent (below every |value| >= 0)
_PAST_END = -1.0  # score of a position past a short region's end (below everything)


def bounded_chunks(d: int, k: int, peers: int) -> tuple[int, int]:
    """Entries per chunk of the bounded sparse all-reduce (``"allreduce"``): ``(c1, c2)`` with
    ``c1 = min(ceil(3k / 2P), ceil(d/P))`` (stage 1, all-to-all: what a peer sends into each of the
    ``P`` regions of at most ``ceil(d/P)`` entries) and ``c2 = c1`` (stage 2, all-gather: what a
    peer keeps of its reduced region, so the update holds about ``1.5 k`` entries). Each chunk
    travels as ``2c + 1`` fp32 words: ``6k (P-1)/P`` words per peer in all, as Ok-Topk's bound.
    Measured against ``(ceil(2k/P), ceil(k/P))``, the same words: it delivers more of each
    selection and more of the true top-k (``benchmarks/exchange_choice.py``). The cost model prices the
    exchange by the same rule."""
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be an int >= 1, got {d!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not (1 <= k <= d):
        raise ValueError(f"k must be an int in [1, d] = [1, {d}], got {k!r}")
    if isinstance(peers, bool) or not isinstance(peers, int) or peers < 1:
        raise ValueError(f"peers must be an int >= 1, got {peers!r}")
    c = min(-(-3 * k // (2 * peers)), -(-d // peers))
    return c, c


class SparseAllReduce(Exchange):
    """Bounded sparse all-reduce: interleaved regions, a reduce-scatter of the selections with
    capacity ``ceil(3k / 2P)`` per region, each region's exact top ``ceil(3k / 2P)``, all-gather of the results. About ``6 k (P - 1) / P`` words
    per rank whatever ``P``; delivers the part of each selection that made the global top set and
    reports it (see the module docstring). Call each launch's ``finish`` once: it also resets the
    cached marks that the next call's ``delivered`` relies on."""

    name = "allreduce"
    positional = True  # regions are positions mod P: work in the canonical layout

    def launch(self, u: Tensor, sel: Selection | None, out: Tensor, route: Route, cache: dict[str, Tensor]) -> Launched:
        assert sel is not None
        d, k, P = sel.d, sel.k, route.peers
        c1, c2 = bounded_chunks(d, k, P)
        R = -(-d // P)  # the largest region's size; slot R of the region buffer is the trash
        W1, W2 = codec.message_words(c1), codec.message_words(c2)
        dev = out.device
        j = dist.get_rank(route.group) if P > 1 else 0  # the region this rank owns
        n_j = max(0, -(-(d - j) // P))  # its real size

        # --- stage 1: pack per destination region ([P, W1] chunks, then 2k trash words) ---------
        idx = sel.indices.long()
        if sel.order is not None:  # canonical positions: the same regions whatever the bucket layout
            idx = sel.order.index_select(0, idx)
        vals = sel.values.to(torch.float32)
        region = idx % P
        local = idx // P
        mag_bits = vals.abs().view(torch.int32).long()  # monotone in |value| (non-negative floats)
        key = (region << _MAG_BITS) | ((1 << _MAG_BITS) - 1 - mag_bits)  # by region, then largest first
        sorted_key, order = torch.sort(key, stable=True)
        ar_k = torch.arange(k, device=dev)
        ar_p = torch.arange(P, device=dev)
        starts = torch.searchsorted(sorted_key, ar_p << _MAG_BITS)  # first sorted entry of each region
        s_region = sorted_key >> _MAG_BITS
        rank_in_region = ar_k - starts[s_region]
        kept = rank_in_region < c1  # sent; the rest are not delivered
        trash = P * W1
        vslot = torch.where(kept, s_region * W1 + rank_in_region, trash + ar_k)
        pslot = torch.where(kept, s_region * W1 + c1 + rank_in_region, trash + k + ar_k)

        send = buffer(cache, "ar_send", P * W1 + 2 * k, dev)
        chunks = send[:trash].view(P, W1)
        chunks[:, :c1].zero_()  # padding adds nothing...
        chunks[:, c1 : 2 * c1].view(torch.int32).fill_(R)  # ...at the owner's trash position
        chunks[:, 2 * c1].copy_(sel.flag.expand(P))
        send.index_copy_(0, vslot, vals[order])
        send.view(torch.int32).index_copy_(0, pslot, local[order].to(torch.int32))
        sent = buffer(cache, "ar_sent", k, dev, torch.bool)
        sent.index_copy_(0, order, kept)  # back to the selection's order

        recv = buffer(cache, "ar_recv", P * W1, dev)
        if P > 1:
            dist.all_to_all_single(recv, send[:trash], group=route.group, async_op=True).wait()
        else:
            recv.copy_(send[:trash])

        # --- reduce this rank's region and select its exact top-c2 -----------------------------
        r_vals, r_pos, r_flags = codec.unpack(recv, c1)
        r_pos = r_pos.long()  # (index_copy_ wants int64)
        acc = buffer(cache, "ar_acc", R + 1, dev)
        acc.zero_().index_add_(0, r_pos, r_vals)
        scores = buffer(cache, "ar_scores", R + 1, dev)
        scores.fill_(_UNTOUCHED).index_copy_(0, r_pos, acc.index_select(0, r_pos).abs_())
        scores[n_j:R].fill_(_PAST_END)
        top_scores, top_pos = torch.topk(scores[:R], c2)

        msg = buffer(cache, "ar_msg", W2, dev)
        msg[:c2].copy_(acc.index_select(0, top_pos))
        msg[c2 : 2 * c2].view(torch.int32).copy_(top_pos)
        msg[2 * c2].copy_(r_flags.sum())  # NaN if any peer's u was non-finite

        # --- stage 2: all-gather the owners' results --------------------------------------------
        gathered = buffer(cache, "ar_gathered", P * W2, dev)
        if P > 1:
            work = all_gather(gathered, msg, group=route.group, async_op=True)
        else:
            gathered.copy_(msg)
            work = _Done(gathered)

        prev_marks = cache.get("ar_marks")
        marks = buffer(cache, "ar_marks", d + 1, dev, torch.bool)  # slot d: positions past the end
        if marks is not prev_marks:
            marks.zero_()  # kept all-False between calls (finish resets what it marked)

        def finish() -> Delivery:
            values, pos, flags = codec.unpack(gathered, c2)
            g = pos.view(P, c2).long() * P + ar_p.view(P, 1)  # global index l P + j
            g = g.view(-1)
            real = g < d
            at = torch.where(real, g, 0)
            if sel.order_inv is not None:  # back from canonical positions to this tensor's
                at = sel.order_inv.index_select(0, at)
            out.index_add_(0, at, torch.where(real, values, 0.0), alpha=1.0 / route.divisor)
            g_mark = torch.where(real, g, d)
            marks.index_fill_(0, g_mark, True)
            delivered = marks.index_select(0, idx).logical_and_(sent)
            marks.index_fill_(0, g_mark, False)  # reset for the next call
            return Delivery(flags.sum(), delivered)

        return Launched(work, finish)

    def message_bytes(self, k: int, d: int, peers: int) -> int:
        c1, c2 = bounded_chunks(d, k, peers)
        return 4 * (codec.message_words(c1) * peers + codec.message_words(c2))

    def volume_bytes(self, k: int, d: int, peers: int) -> int:
        """``4 P (2 c1 + 1) + 4 P (2 c2 + 1)``: the all-to-all's send buffer and the gathered results
        (so the wire carries ``(P - 1) 4 (2 c1 + 1) + (P - 1) 4 (2 c2 + 1)``)."""
        c1, c2 = bounded_chunks(d, k, peers)
        return 4 * peers * codec.message_words(c1) + 4 * peers * codec.message_words(c2)

    def hops(self, peers: int) -> int:
        """An all-to-all, then an all-gather: ``2 (P - 1)``."""
        return 2 * (peers - 1)

    def time(self, k: int, d: int, peers: int, price: Pricing) -> float:
        """:meth:`Exchange.time` plus the region's host work (an assumption: it was not timed)::

            + g P (c1 + c2 - k) + p (d/P) (1 + s) + q c2        (region: zero, scatter, select)

        stage 1 scatters the ``P c1`` received entries into a region of ``d/P`` and selects ``c2``
        of it; the decode scatters ``P c2`` entries instead of the all-gather's ``P k``."""
        t = super().time(k, d, peers, price)
        if peers > 1:
            h = price.host
            c1, c2 = bounded_chunks(d, k, peers)
            t += h.scatter_s * peers * (c1 + c2 - k) + h.pass_s * d / peers * (1 + h.select_passes) + h.select_per_k_s * c2
        return t


class _Done:
    """A completed work handle (``P = 1``: nothing crosses the wire), with the parts of
    ``dist.Work`` that drivers use (``wait``, ``is_completed``, ``get_future``)."""

    def __init__(self, result: Tensor) -> None:
        self._result = result

    def wait(self, timeout: object = None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def get_future(self) -> torch.futures.Future:
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result([self._result])
        return fut
