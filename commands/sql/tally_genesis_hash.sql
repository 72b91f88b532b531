-- The hash every stream's chain starts from (the "previous hash" of its version 1).
CREATE OR REPLACE FUNCTION tally_genesis_hash() RETURNS bytea LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT decode(repeat('00', 32), 'hex')
$$;
