"""astronn-dist worker: the science core (pure functions on arrays) and the Celery task around it.

Importing this package never imports torch; only ``worker.model``, ``worker.inference`` and the
modules that run the network do.
"""

PIPELINE_VERSION = "0.3.0"
"""Stored in every row. 0.2.0: CPU dropout masks from numpy's SFC64 (other, equally valid masks
than 0.1.0's torch mt19937, so other MC numbers for the same model and seed)."""
