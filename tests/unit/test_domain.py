"""The vocabulary: flows as data, commands as the caller states them, events as they are stored."""

from __future__ import annotations

import msgspec
import pytest

from domain import (
    EVENT_TYPES,
    FLOWS,
    MAX_AMOUNT,
    RECORDED_OUTCOMES,
    REJECTIONS,
    CreditsSpent,
    DomainError,
    Entry,
    GrantBonus,
    SpendCredits,
    TopUpCredits,
    UnknownEventType,
    WalletOpened,
    decode_event,
    kind_of,
)
from tests.model import legs


def test_each_flow_is_named_once_and_tags_its_command() -> None:
    assert [f.kind for f in FLOWS] == ["top_up", "bonus", "spend"]
    assert len({f.event_type for f in FLOWS}) == len(FLOWS)
    for flow in FLOWS:
        assert kind_of(flow.command) == flow.kind
        assert EVENT_TYPES[flow.event_type] is flow.event
    assert msgspec.json.decode(msgspec.json.encode(SpendCredits(user_id="u", asset="GOLD", amount=1)))[
        "kind"
    ] == ("spend")


def test_the_flows_data_says_what_the_readme_says() -> None:
    assert legs("top_up", "u", 10) == [
        {"account": "system:treasury", "amount": -10},
        {"account": "user:u", "amount": 10},
    ]
    assert legs("bonus", "u", 3) == [
        {"account": "system:bonus", "amount": -3},
        {"account": "user:u", "amount": 3},
    ]
    assert legs("spend", "u", 4) == [
        {"account": "system:revenue", "amount": 4},
        {"account": "user:u", "amount": -4},
    ]


def test_amount_bounds_are_part_of_the_command_type() -> None:
    for bad in (0, -1, MAX_AMOUNT + 1, "5", 1.0, True):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({"user_id": "u", "asset": "GOLD", "amount": bad}, SpendCredits)
    assert (
        msgspec.convert({"user_id": "u", "asset": "GOLD", "amount": MAX_AMOUNT}, SpendCredits).amount
        == MAX_AMOUNT
    )
    assert GrantBonus(user_id="u", asset="GOLD", amount=1) != TopUpCredits(
        user_id="u", asset="GOLD", amount=1
    )


def test_stored_events_decode_into_their_classes() -> None:
    spent = decode_event(
        "CreditsSpent",
        b'{"transaction_id": "t", "kind": "spend", "user_id": "u", "asset": "GOLD", "amount": 4,'
        b' "entries": [{"account": "system:revenue", "amount": 4}, {"account": "user:u", "amount": -4}],'
        b' "reference": null, "metadata": {}, "balance_after": 6}',
    )
    assert isinstance(spent, CreditsSpent)
    assert spent.entries == (Entry("system:revenue", 4), Entry("user:u", -4))
    assert decode_event("WalletOpened", '{"user_id": "u", "metadata": {"a": "b"}}') == WalletOpened(
        user_id="u", metadata={"a": "b"}
    )


def test_decoding_is_strict() -> None:
    with pytest.raises(UnknownEventType):
        decode_event("WalletFrozen", "{}")
    with pytest.raises(msgspec.ValidationError):  # a field the class does not know
        decode_event("WalletOpened", '{"user_id": "u", "metadata": {}, "extra": 1}')
    with pytest.raises(msgspec.ValidationError):  # a field it needs
        decode_event("WalletOpened", '{"user_id": "u"}')


def test_every_rejection_is_registered_under_its_own_code() -> None:
    rejections = DomainError.__subclasses__()
    assert sorted(cls.code for cls in rejections) == sorted(REJECTIONS)  # none missing, no code twice
    assert all(REJECTIONS[cls.code] is cls for cls in rejections)
    assert set(RECORDED_OUTCOMES) == {"accepted"} | {cls.code for cls in rejections if cls.recorded}
