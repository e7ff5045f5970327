"""astronn-dist worker (``astronn_dist.worker``), in three layers on two base modules:

* :mod:`~astronn_dist.worker.contract` (the request, flag bits, limits, names; no numpy),
  :mod:`~astronn_dist.worker.config` (settings, defaults),
  :mod:`~astronn_dist.worker.devices` (device specs, process plan, device per process) and
  :mod:`~astronn_dist.worker.tables` (the catalog reader: CSV, FITS, Parquet in blocks);
* :mod:`~astronn_dist.worker.science`: reading, normalization, network, inference, distances;
* :mod:`~astronn_dist.worker.service`: Celery app and task, chunks, results store, metrics;
* :mod:`~astronn_dist.worker.modeling`: synthetic spectra, training, astroNN model import;
* :mod:`~astronn_dist.worker.api`: the public function for notebooks.

Importing this package never imports torch; only ``science.model``, ``science.inference`` and
the modules that run the network do.
"""

PIPELINE_VERSION = "0.3.0"
"""Stored in every row. 0.2.0: CPU dropout masks from numpy's SFC64 (other, equally valid masks
than 0.1.0's torch mt19937, so other MC numbers for the same model and seed)."""
