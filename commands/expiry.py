"""Recording the expiry of holds: the sweep `tally projector` runs every few seconds.

Nothing depends on it: a hold stops holding at its ``expires_at`` by the database's clock, whether
or not its HoldExpired is recorded (commands/sql/tally_held.sql). The sweep only puts expiries in
the history. It finds the wallets with a hold past its expiry in the holds read model (which may
lag: the wallet's snapshot decides), then ends each wallet's expired holds in a transaction of its
own (commands/sql/tally_expire_wallet_holds.sql), so it holds one wallet's lock at a time and skips
a busy wallet rather than wait for it.
"""

from __future__ import annotations

import logging
from typing import Final

from commands.errors import is_transient
from projections.reader import Reader

log = logging.getLogger("tally.expiry")

# Per sweep: at most this many wallets, and this many holds of one wallet.
SWEEP_WALLETS: Final = 500
SWEEP_HOLDS_PER_WALLET: Final = 100

# The wallets whose oldest expired hold is oldest first: a wallet with many (or one that stays busy
# and is skipped) takes one place, not all of them.
_EXPIRED_WALLETS = """
SELECT user_id FROM rm_holds
 WHERE status = 'active' AND expires_at <= now()
 GROUP BY user_id ORDER BY min(expires_at) LIMIT $1
"""
_EXPIRE_WALLET_HOLDS = "SELECT tally_expire_wallet_holds($1, $2)"


async def expire_holds(
    pool: Reader, *, wallets: int = SWEEP_WALLETS, per_wallet: int = SWEEP_HOLDS_PER_WALLET
) -> int:
    """Record the expiries that have passed; how many holds it ended. A wallet whose expiries cannot
    be recorded (a broken snapshot, say) is logged and left, and the others are still swept; the
    database being away ends the sweep."""
    ended = 0
    for row in await pool.fetch(_EXPIRED_WALLETS, wallets):
        try:
            ended += await pool.fetchval(_EXPIRE_WALLET_HOLDS, row["user_id"], per_wallet)
        except Exception as exc:
            if is_transient(exc):
                raise
            log.exception("the expiry of wallet %s's holds could not be recorded", row["user_id"])
    return ended
