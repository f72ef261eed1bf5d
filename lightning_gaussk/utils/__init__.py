"""Layer 0, under everything: rank-zero messages without Lightning (:mod:`~lightning_gaussk.utils.log`)."""
