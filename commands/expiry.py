"""Recording the expiry of holds: the sweep `tally projector` runs every few seconds.

Nothing depends on it: a hold stops holding at its ``expires_at`` by the database's clock, whether
or not its HoldExpired is recorded (commands/sql/tally_held.sql). The sweep only puts expiries in
the history. It finds the wallets with a hold past its expiry in the holds read model (which may
lag: the wallet's snapshot decides), then ends each wallet's expired holds in a transaction of its
own (commands/sql/tally_expire_wallet_holds.sql), so it holds one wallet's lock at a time and skips
a busy wallet rather than wait for it.
"""

from __future__ import annotations

from typing import Final

from projections.reader import Reader

# Per sweep: at most this many wallets, and this many holds of one wallet.
SWEEP_WALLETS: Final = 500
SWEEP_HOLDS_PER_WALLET: Final = 100

_EXPIRED_WALLETS = """
SELECT DISTINCT user_id FROM (
    SELECT user_id FROM rm_holds
     WHERE status = 'active' AND expires_at <= now()
     ORDER BY expires_at LIMIT $1) h
"""
_EXPIRE_WALLET_HOLDS = "SELECT tally_expire_wallet_holds($1, $2)"


async def expire_holds(
    pool: Reader, *, wallets: int = SWEEP_WALLETS, per_wallet: int = SWEEP_HOLDS_PER_WALLET
) -> int:
    """Record the expiries that have passed; how many holds it ended."""
    ended = 0
    for row in await pool.fetch(_EXPIRED_WALLETS, wallets):
        ended += await pool.fetchval(_EXPIRE_WALLET_HOLDS, row["user_id"], per_wallet)
    return ended
