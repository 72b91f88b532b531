"""The read side: projectors that turn events into read models, and the queries that serve them."""
