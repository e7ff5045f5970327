"""The science core: apStar reading, DR17 continuum normalization, the ApogeeDistBCNN and its
MC-dropout inference, extinction, distances and flags, and the pipeline that chains them.

Pure functions and classes on arrays and files: no Celery, no database, no broker. Rests on
:mod:`astronn_dist.worker.contract` and :mod:`astronn_dist.worker.config` only.
"""
