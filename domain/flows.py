"""The flows: every kind of transaction, as data. Defined here, once.

``tally migrate`` writes them into the ``flows`` table and refuses to change one that is already
there (history depends on it); the SQL decider computes every transaction's legs from that table
(commands/sql/tally_legs.sql) and ``tally verify`` checks every stored transaction against it.

A flow moves credits between the user's wallet and one system account: ``user_sign`` times the amount to
the user, the opposite to the system account. So every transaction balances, and credits are
closed-loop: no flow moves credits from one user to another.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Literal

from domain.commands import GrantBonus, SpendCredits, TopUpCredits, TransactionCommand, kind_of
from domain.events import BonusGranted, CreditsSpent, CreditsToppedUp, TransactionEvent


class SystemAccount(StrEnum):
    TREASURY = "treasury"  # issues credits: its balance is minus the amount in circulation
    BONUS = "bonus"  # funds incentives
    REVENUE = "revenue"  # receives spends


@dataclass(frozen=True, slots=True)
class Flow:
    command: type[TransactionCommand]  # its tag is the flow's kind
    event: type[TransactionEvent]
    system_account: SystemAccount
    user_sign: Literal[1, -1]

    @property
    def kind(self) -> str:
        return kind_of(self.command)

    @property
    def event_type(self) -> str:
        return self.event.__name__


FLOWS: Final = (
    Flow(TopUpCredits, CreditsToppedUp, SystemAccount.TREASURY, +1),
    Flow(GrantBonus, BonusGranted, SystemAccount.BONUS, +1),
    Flow(SpendCredits, CreditsSpent, SystemAccount.REVENUE, -1),
)
FLOWS_BY_KIND: Final = {flow.kind: flow for flow in FLOWS}
