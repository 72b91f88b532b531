"""Tally's benchmark: spends per second and latency of the HTTP API, set against the raw-SQL limit,
and what reads cost on a deep wallet.

``make bench`` (``python -m bench``) measures two spend workloads, each over HTTP and directly
through the event store's SQL function, on a fresh database it sets up itself, and the read cost
(as-of and history pages on a wallet of 1,000,000 events against one of ten) on a database it
builds once and keeps; see ``bench.cli`` for the order of a run, ``bench.scenarios`` and
``bench.reads`` for what each scenario measures, ``bench.load`` for how spends are driven and
``bench.read_wallets`` for how the deep wallet is built.
"""
