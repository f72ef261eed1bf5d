"""``python -m lightning_gaussk.preflight`` / ``gaussk-preflight``: will sparsification pay on this
job? (the public path; the measurements live in :mod:`lightning_gaussk.observe.preflight`)."""

import sys

from lightning_gaussk.observe.preflight import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
