"""The values every command and event is made of: identifiers, amounts, metadata, accounts.

Sign convention: an account's balance is credits minus debits; an entry's amount is positive for a
credit. Every transaction's entries sum to zero, so the balances of an asset always sum to zero.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

# `(?!\n)` before `$`: in Python's re (which msgspec and Litestar use), `$` also matches before a
# trailing newline, so "GOLD\n" would pass a bare `^...$`. The lookahead keeps the pattern valid
# for the JSON Schema (ECMA 262) the OpenAPI document publishes, where `\Z` does not exist.
ASSET_CODE_PATTERN: Final = r"^[A-Z][A-Z0-9_]{1,15}(?!\n)$"
USER_ID_PATTERN: Final = r"^[A-Za-z0-9._@-]{1,64}(?!\n)$"
# The largest value PostgreSQL's bigint holds: positions, versions and cursors above it are not ours.
MAX_BIGINT: Final = 2**63 - 1
MAX_AMOUNT: Final = 10**15

AssetCode = Annotated[str, msgspec.Meta(pattern=ASSET_CODE_PATTERN)]
UserId = Annotated[str, msgspec.Meta(pattern=USER_ID_PATTERN)]
Amount = Annotated[int, msgspec.Meta(ge=1, le=MAX_AMOUNT)]
# PostgreSQL's text and jsonb cannot hold U+0000: refuse it at the edge (found in review: it used
# to reach the database and fail the whole group-committed batch).
NO_NUL: Final = "^[^\\x00]*$"
MetadataKey = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=NO_NUL)]
MetadataValue = Annotated[str, msgspec.Meta(max_length=512, pattern=NO_NUL)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], msgspec.Meta(max_length=16)]
Reference = Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern=NO_NUL)]
AssetName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=NO_NUL)]
Decimals = Annotated[int, msgspec.Meta(ge=0, le=18)]
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=NO_NUL)]
# A hold lasts 1 s to 30 days; one that names no expiry lasts an hour (README, "Holds").
MAX_HOLD_SECONDS: Final = 30 * 24 * 3600
DEFAULT_HOLD_SECONDS: Final = 3600
HoldSeconds = Annotated[int, msgspec.Meta(ge=1, le=MAX_HOLD_SECONDS)]


def user_account(user_id: str) -> str:
    return f"user:{user_id}"


def system_account(name: str) -> str:
    return f"system:{name}"


# The clients migrations/0007_clients.sql made, which hold no secret: the one every command recorded
# before callers had identities belongs to (until a client adopts them: `tally keys adopt`), and the
# one `tally seed` commands as.
BEFORE_IDENTITIES_CLIENT: Final = "00000000-0000-0000-0000-000000000000"
SEED_CLIENT: Final = "00000000-0000-0000-0000-000000000001"
