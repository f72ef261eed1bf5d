"""Layer 6, checkpoints: every rank's state in its own shard file, a manifest beside it, and the
restore protocol (checks, layout policy, a failure on one rank raised on every rank).

Imports: the layers below.
"""
