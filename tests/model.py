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
            return Outcome(
                "insufficient_funds",
                False,
                {"balance": balance, "held": 0, "available": balance, "amount": command.amount},
            )
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


# --- the purchase lifecycle ------------------------------------------------------------------
# The rules of reversals and holds, as the README states them, for one wallet's commands decided
# one at a time (tests/integration/test_model_based.py::test_the_lifecycle_agrees_with_the_model).
# Ids are the database's (the model cannot draw them): an accepted command's answer names the new
# transaction or hold, and the model keeps it under that id.


@dataclass
class Txn:
    user_id: str
    asset: str
    amount: int
    entries: list[dict[str, Any]]
    reversal: bool
    reversed: int = 0


@dataclass
class HeldCredits:
    user_id: str
    asset: str
    amount: int
    remaining: int
    ended: str | None = None  # "captured" or "voided" (holds here never expire)


@dataclass
class Lifecycle:
    """Wallets (balances, versions), their transactions and holds."""

    wallets: dict[str, Wallet] = field(default_factory=dict)
    transactions: dict[str, Txn] = field(default_factory=dict)
    holds: dict[str, HeldCredits] = field(default_factory=dict)

    def copy(self) -> Lifecycle:
        return Lifecycle(
            wallets={u: Wallet(w.version, dict(w.balances)) for u, w in self.wallets.items()},
            transactions={k: Txn(**vars(t)) for k, t in self.transactions.items()},
            holds={k: HeldCredits(**vars(h)) for k, h in self.holds.items()},
        )

    def held(self, user_id: str, asset: str) -> int:
        return sum(
            h.remaining
            for h in self.holds.values()
            if h.user_id == user_id and h.asset == asset and h.ended is None
        )

    def _accept(self, user_id: str, asset: str, delta: int) -> dict[str, Any]:
        wallet = self.wallets[user_id]
        wallet.version += 1
        wallet.balances[asset] = wallet.balances.get(asset, 0) + delta
        return {"balance_after": wallet.balances[asset], "wallet_version": wallet.version}

    def _short(self, user_id: str, asset: str, amount: int, taken: int) -> Outcome | None:
        balance = self.wallets[user_id].balances.get(asset, 0)
        held = self.held(user_id, asset)
        if balance - held < taken:
            return Outcome("insufficient_funds", False, {"available": balance - held, "amount": amount})
        return None

    def decide(self, op: dict[str, Any], answer: dict[str, Any]) -> Outcome:
        """Decide ``op``, changing this model; ``answer`` is the database's body, whose new ids the
        model adopts when it predicts an acceptance too."""
        kind = op["op"]
        if kind in ("top_up", "spend"):
            sign = FLOWS_BY_KIND[kind].user_sign
            if sign < 0 and (short := self._short(op["user_id"], op["asset"], op["amount"], op["amount"])):
                return short
            facts = {"kind": kind, "amount": op["amount"], "entries": legs(kind, op["user_id"], op["amount"])}
            facts |= self._accept(op["user_id"], op["asset"], sign * op["amount"])
            self.transactions[answer.get("transaction_id", "(refused)")] = Txn(
                op["user_id"], op["asset"], op["amount"], facts["entries"], reversal=False
            )
            return Outcome("accepted", False, facts)
        if kind == "reverse":
            return self._reverse(op, answer)
        if kind == "hold":
            if short := self._short(op["user_id"], op["asset"], op["amount"], op["amount"]):
                return short
            self._accept(op["user_id"], op["asset"], 0)
            self.holds[answer.get("hold_id", "(refused)")] = HeldCredits(
                op["user_id"], op["asset"], op["amount"], op["amount"]
            )
            return Outcome(
                "accepted", False, {"amount": op["amount"], "remaining": op["amount"], "status": "active"}
            )
        return self._end_hold(op, answer)

    def _reverse(self, op: dict[str, Any], answer: dict[str, Any]) -> Outcome:
        original = self.transactions.get(op["target"])
        if original is None:
            return Outcome("transaction_not_found", False, {})
        if original.reversal:
            return Outcome("not_reversible", False, {})
        remaining = original.amount - original.reversed
        amount = op["amount"] if op["amount"] is not None else remaining
        if amount > remaining or amount < 1:
            return Outcome("reversal_exceeds_remaining", False, {"remaining": remaining})
        entries = [
            {"account": e["account"], "amount": -e["amount"] // original.amount * amount}
            for e in original.entries
        ]
        delta = sum(e["amount"] for e in entries if e["account"] == user_account(original.user_id))
        if delta < 0 and (short := self._short(original.user_id, original.asset, amount, -delta)):
            return short
        original.reversed += amount
        facts = {"kind": "reversal", "amount": amount, "entries": entries, "reverses": op["target"]}
        facts |= self._accept(original.user_id, original.asset, delta)
        self.transactions[answer.get("transaction_id", "(refused)")] = Txn(
            original.user_id, original.asset, amount, entries, reversal=True
        )
        return Outcome("accepted", False, facts)

    def _end_hold(self, op: dict[str, Any], answer: dict[str, Any]) -> Outcome:
        hold = self.holds.get(op["hold_id"])
        if hold is None:
            return Outcome("hold_not_found", False, {})
        if hold.ended is not None:
            return Outcome("hold_not_active", False, {})
        if op["op"] == "void":
            self._accept(hold.user_id, hold.asset, 0)
            hold.ended, hold.remaining = "voided", 0
            return Outcome("accepted", False, {"status": "voided", "remaining": 0})
        amount = op["amount"] if op["amount"] is not None else hold.remaining
        if amount > hold.remaining:
            return Outcome("capture_exceeds_hold", False, {"remaining": hold.remaining})
        facts = {"kind": "spend", "amount": amount, "hold_id": op["hold_id"],
                 "entries": legs("spend", hold.user_id, amount)}  # fmt: skip
        facts |= self._accept(hold.user_id, hold.asset, -amount)
        hold.remaining = 0 if op["final"] else hold.remaining - amount
        if hold.remaining == 0:
            hold.ended = "captured"
        self.transactions[answer.get("transaction_id", "(refused)")] = Txn(
            hold.user_id, hold.asset, amount, facts["entries"], reversal=False
        )
        return Outcome("accepted", False, facts)
