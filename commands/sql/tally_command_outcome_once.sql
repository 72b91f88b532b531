-- A command's row is written once, whole, with its outcome (tally_record_outcome): after that,
-- nothing about it changes; except that a command recorded before callers had identities may move,
-- once, to the client that adopts those keys (`tally keys adopt`, api/keys.py). The WHEN clause
-- keeps the check free for that one legitimate update; the function runs only to refuse.
-- Proven by tests/integration/test_event_store.py::test_history_cannot_be_changed.
CREATE OR REPLACE FUNCTION tally_command_outcome_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'command % already has its outcome', OLD.command_id
        USING ERRCODE = 'restrict_violation';
END $$;

CREATE OR REPLACE TRIGGER commands_outcome_once BEFORE UPDATE ON commands FOR EACH ROW
    -- adopting a key recorded before identities: only the client, and only from that one
    WHEN (OLD.client_id <> '00000000-0000-0000-0000-000000000000'
          OR (NEW.command_id, NEW.fingerprint, NEW.outcome, NEW.response, NEW.stream_id, NEW.event_id,
              NEW.metadata, NEW.recorded_at)
             IS DISTINCT FROM (OLD.command_id, OLD.fingerprint, OLD.outcome, OLD.response, OLD.stream_id,
                               OLD.event_id, OLD.metadata, OLD.recorded_at))
    EXECUTE FUNCTION tally_command_outcome_once();
