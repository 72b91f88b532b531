-- The body of a refused command: its domain outcome as `code`, a sentence for people as `detail`,
-- and the figures a program needs (`extra`). The API turns it into problem+json with the status it
-- chooses for the code (api/errors.py).
CREATE OR REPLACE FUNCTION tally_rejection(p_code text, p_detail text, p_extra jsonb DEFAULT '{}')
RETURNS jsonb LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object('code', p_code, 'detail', p_detail) || p_extra
$$;
