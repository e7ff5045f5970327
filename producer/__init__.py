"""astronn-dist producer: catalogs and directories -> chunked JSON messages on the Redis queue.

Never imports torch: operators run it on machines without the model.
"""
