"""Node mode (dense inside a node, sparse between nodes), kept under its old import path.

The topology lives in :mod:`lightning_gaussk.core.topology` (:class:`~lightning_gaussk.core.topology.Node`,
:class:`~lightning_gaussk.core.topology.NodeSlot`); the steps run in the core pipeline
(:func:`lightning_gaussk.core.pipeline.reduce`) like flat mode's. ``node_hook`` is the DDP hook
itself: a state whose layout is node mode runs node mode.
"""

from __future__ import annotations

from lightning_gaussk.core.topology import NodeSlot
from lightning_gaussk.hook import gaussk_hook as node_hook

__all__ = ["NodeSlot", "node_hook"]
