-- A command's row is claimed without an outcome (tally_claim_command) and gets it once, in the same
-- transaction (tally_record_outcome): after that, nothing about it changes. The WHEN clause keeps
-- the check free for the one legitimate update; the function runs only to refuse.
-- Proven by tests/integration/test_event_store.py::test_history_cannot_be_changed.
CREATE OR REPLACE FUNCTION tally_command_outcome_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'command % already has its outcome', OLD.command_id
        USING ERRCODE = 'restrict_violation';
END $$;

CREATE OR REPLACE TRIGGER commands_outcome_once BEFORE UPDATE ON commands FOR EACH ROW
    WHEN (OLD.outcome IS NOT NULL OR NEW.outcome IS NULL OR NEW.response IS NULL
          OR NEW.client_id <> OLD.client_id OR NEW.command_id <> OLD.command_id
          OR NEW.fingerprint <> OLD.fingerprint
          OR NEW.metadata <> OLD.metadata OR NEW.recorded_at <> OLD.recorded_at)
    EXECUTE FUNCTION tally_command_outcome_once();
