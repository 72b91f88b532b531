"""Tally's shell: the Litestar app, its settings, the database bootstrap and the ``tally`` CLI."""
