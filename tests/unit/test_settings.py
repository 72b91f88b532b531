from __future__ import annotations

from pathlib import Path

import pytest

from api.settings import Settings, SettingsError, load_settings
from projections.positions import Position


def test_defaults_without_environment() -> None:
    assert load_settings({}) == Settings()


def test_values_are_read_and_typed() -> None:
    settings = load_settings(
        {"DATABASE_URL": "postgresql://x/y", "HOST": "0.0.0.0", "PORT": "9000", "TALLY_DATA_DIR": "/tmp/t",
         "TALLY_CONSISTENCY_TIMEOUT": "2.5"}
    )  # fmt: skip
    assert settings.database_url == "postgresql://x/y"
    assert (settings.host, settings.port, settings.data_dir) == ("0.0.0.0", 9000, Path("/tmp/t"))
    assert settings.consistency_timeout == 2.5


@pytest.mark.parametrize(
    ("name", "value"),
    [("PORT", "eighty"), ("PORT", "70000"), ("TALLY_CONSISTENCY_TIMEOUT", "-1"), ("TALLY_POOL_MAX_SIZE", "0"),
     ("TALLY_LOG_LEVEL", "loud"), ("TALLY_FEED_HEARTBEAT", "inf"),
     ("TALLY_WEBHOOK_RETRY_SECONDS", "1e13"), ("TALLY_WEBHOOK_RETRY_SECONDS", "nan"),
     ("TALLY_WEBHOOK_TIMEOUT", "0"), ("TALLY_WEBHOOK_BACKOFF", "inf")],
)  # fmt: skip
def test_an_invalid_value_names_its_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        load_settings({name: value})


def test_consistency_tokens_round_trip_and_order() -> None:
    assert Position.parse("12.34") == Position(12, 34)
    assert Position.parse(Position(5, 6).token()) == Position(5, 6)
    assert Position(2, 1) > Position(1, 99)  # transaction id first, then position
    for bad in ("", "12", "a.b", "1.2.3", "-1.2", "1." + "9" * 50, f"{2**64}.1", f"1.{2**63}"):
        with pytest.raises(ValueError, match="consistency token"):
            Position.parse(bad)
