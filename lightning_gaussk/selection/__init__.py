"""Layer 1, selection: exactly ``k`` entries of a tensor, by name.

- :mod:`~lightning_gaussk.selection.selectors`: the registry (``gaussk``, ``topk``, ``randk``,
  ``hist``, ``dgc``, ...), :func:`select` and the fused ``u = g + r`` + select pass;
- :mod:`~lightning_gaussk.selection.cpu`, :mod:`~lightning_gaussk.selection.histogram`,
  :mod:`~lightning_gaussk.selection.triton`: the backends (CPU, histogram threshold, Triton).

Imports: :mod:`lightning_gaussk.utils` only.
"""
