"""astronn-dist worker: the science core (pure functions on arrays) and the Celery task around it.

Importing this package never imports torch; only ``worker.model``, ``worker.inference`` and the
modules that run the network do.
"""

PIPELINE_VERSION = "0.1.0"
