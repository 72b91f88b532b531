"""A Python model of the write side's rules: the oracle tests/integration/test_model_based.py checks
the SQL decider against (commands/sql/tally_post_transactions.sql).

It is written from the rules as the README states them, not from the SQL: a batch of transaction
commands is decided as if each ran alone, in request order, with these rules:

* a key recorded before replays its outcome when the request is the same (same fingerprint), and is
  refused as ``idempotency_key_reused`` (not recorded) when it is not;
* a key repeated within the batch gets its first claimed occurrence's outcome, replayed (or
  ``idempotency_key_reused`` when its request differs);
* an unknown asset, then an unknown wallet, is refused and not recorded (the key stays free);
* then, on the wallet: ``version_mismatch`` when If-Match names another version, else
  ``insufficient_funds`` when the balance would go below zero (both recorded), else accepted: the
  flow's legs (domain/flows.py), the balance after, the next version.

Only the flows' data comes from the code under test (domain.FLOWS is the one definition of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from domain import FLOWS_BY_KIND, system_account, user_account


@dataclass(frozen=True)
class Command:
    key: str
    fingerprint: bytes
    kind: str
    user_id: str
    asset: str
    amount: int
    expected_version: int | None = None


@dataclass(frozen=True)
class Outcome:
    """What the decider answers for one command: its outcome, whether it was replayed, and the
    parts of the body the model predicts (for an accepted command, the transaction; for a
    rejection, its figures)."""

    outcome: str
    replayed: bool
    facts: dict[str, Any]


@dataclass
class Wallet:
    version: int = 1
    balances: dict[str, int] = field(default_factory=dict)


def legs(kind: str, user_id: str, amount: int) -> list[dict[str, Any]]:
    """The flow's legs: the system account by the opposite of the user's, then the user."""
    flow = FLOWS_BY_KIND[kind]
    delta = flow.user_sign * amount
    return [
        {"account": system_account(flow.system_account), "amount": -delta},
        {"account": user_account(user_id), "amount": delta},
    ]


@dataclass
class Ledger:
    assets: set[str]
    wallets: dict[str, Wallet] = field(default_factory=dict)
    recorded: dict[str, tuple[bytes, Outcome]] = field(default_factory=dict)

    def open_wallet(self, user_id: str) -> None:
        self.wallets.setdefault(user_id, Wallet())

    def copy(self) -> Ledger:
        return Ledger(
            assets=set(self.assets),
            wallets={u: Wallet(w.version, dict(w.balances)) for u, w in self.wallets.items()},
            recorded=dict(self.recorded),
        )

    def run_batch(self, commands: list[Command]) -> list[Outcome]:
        """Decide a batch, changing this ledger; one outcome per command, in request order."""
        results: list[Outcome | None] = [None] * len(commands)
        claimed: dict[str, int] = {}
        repeats: dict[int, int] = {}
        for i, command in enumerate(commands):
            if command.key in claimed:
                repeats[i] = claimed[command.key]
            elif command.key in self.recorded:
                fingerprint, earlier = self.recorded[command.key]
                results[i] = (
                    Outcome(earlier.outcome, True, earlier.facts)
                    if fingerprint == command.fingerprint
                    else Outcome("idempotency_key_reused", False, {})
                )
            elif command.asset not in self.assets:
                results[i] = Outcome("asset_not_found", False, {})
            elif command.user_id not in self.wallets:
                results[i] = Outcome("wallet_not_found", False, {})
            else:
                claimed[command.key] = i
        for i in claimed.values():
            outcome = self._decide(commands[i])
            self.recorded[commands[i].key] = (commands[i].fingerprint, outcome)
            results[i] = outcome
        for i, first in repeats.items():
            decided = results[first]
            assert decided is not None
            results[i] = (
                Outcome(decided.outcome, True, decided.facts)
                if commands[i].fingerprint == commands[first].fingerprint
                else Outcome("idempotency_key_reused", False, {})
            )
        return [r for r in results if r is not None]

    def _decide(self, command: Command) -> Outcome:
        wallet = self.wallets[command.user_id]
        if command.expected_version is not None and command.expected_version != wallet.version:
            return Outcome("version_mismatch", False, {"current_version": wallet.version})
        balance = wallet.balances.get(command.asset, 0)
        after = balance + FLOWS_BY_KIND[command.kind].user_sign * command.amount
        if after < 0:
            return Outcome("insufficient_funds", False, {"balance": balance, "amount": command.amount})
        wallet.version += 1
        wallet.balances[command.asset] = after
        return Outcome(
            "accepted",
            False,
            {
                "kind": command.kind,
                "user_id": command.user_id,
                "asset": command.asset,
                "amount": command.amount,
                "entries": legs(command.kind, command.user_id, command.amount),
                "balance_after": after,
                "wallet_version": wallet.version,
            },
        )
