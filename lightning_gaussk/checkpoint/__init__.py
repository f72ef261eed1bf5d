"""Layer 6, checkpoints: every rank's state in its own shard file, a manifest beside it, and the
restore protocol. By job, bottom up:

- :mod:`~lightning_gaussk.checkpoint.layouts`: the layout a save was made in, and the one it loads into;
- :mod:`~lightning_gaussk.checkpoint.files`: shard and manifest names, atomic writes, checksums,
  manifests, reading one shard with its checks;
- :mod:`~lightning_gaussk.checkpoint.reshard`: the policies for a change of layout (DDP: per
  parameter; FSDP2: by rows), chosen by the marker a save carries;
- :mod:`~lightning_gaussk.checkpoint.formats`: :class:`~lightning_gaussk.checkpoint.formats.SavedState`,
  the one reader of every format ever written;
- :mod:`~lightning_gaussk.checkpoint.protocol`: saving, restoring, and a failure on one rank raised
  on every rank.

Imports: the layers below.
"""
