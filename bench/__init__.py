"""Tally's benchmark: spends per second and latency of the HTTP API, set against the raw-SQL limit.

``make bench`` (``python -m bench``) measures two workloads, each over HTTP and directly through
the event store's SQL function, on a fresh database it sets up itself; see ``bench.cli`` for the
order of a run, ``bench.scenarios`` for what each scenario measures and ``bench.load`` for how.
"""
