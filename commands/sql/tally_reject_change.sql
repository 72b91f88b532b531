-- History is append-only: events, flows and batches' answers are never updated, deleted or
-- truncated, and a command's row is never deleted or truncated either (it is written once, with
-- its outcome: tally_record_outcome.sql, tally_command_outcome_once.sql). These
-- triggers stop anyone who may write the tables (the owner included) from doing it by accident;
-- tally verify's hash chains catch whoever disables them.
-- Proven by tests/integration/test_event_store.py::test_history_cannot_be_changed.
CREATE OR REPLACE FUNCTION tally_reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'table % is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END $$;

CREATE OR REPLACE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION tally_reject_change();
CREATE OR REPLACE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION tally_reject_change();
CREATE OR REPLACE TRIGGER commands_append_only BEFORE DELETE ON commands
    FOR EACH ROW EXECUTE FUNCTION tally_reject_change();
CREATE OR REPLACE TRIGGER commands_no_truncate BEFORE TRUNCATE ON commands
    FOR EACH STATEMENT EXECUTE FUNCTION tally_reject_change();
CREATE OR REPLACE TRIGGER flows_append_only BEFORE UPDATE OR DELETE ON flows
    FOR EACH ROW EXECUTE FUNCTION tally_reject_change();
CREATE OR REPLACE TRIGGER flows_no_truncate BEFORE TRUNCATE ON flows
    FOR EACH STATEMENT EXECUTE FUNCTION tally_reject_change();
CREATE OR REPLACE TRIGGER batches_append_only BEFORE UPDATE OR DELETE ON batches
    FOR EACH ROW EXECUTE FUNCTION tally_reject_change();
CREATE OR REPLACE TRIGGER batches_no_truncate BEFORE TRUNCATE ON batches
    FOR EACH STATEMENT EXECUTE FUNCTION tally_reject_change();
