"""The service layer around the science core: the Celery app and its thin task, the decision of
what to do with a message (process, retry, park, give up), chunk execution without Celery
(shared by the task and ``astronn-dist run``), the worker's per-process state, ``serve``, the
results store and its migrations, messages, metrics and logs.

Imports the science core, never the other way round.
"""
