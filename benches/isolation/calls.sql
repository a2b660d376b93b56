-- Cost of one context-setting call: authenticate() vs set_config(), in-server
-- loops of 50,000 calls each (the loop's own cost is in both).
\set QUIET on
CREATE OR REPLACE FUNCTION pg_temp.time_calls(what text, calls int) RETURNS numeric LANGUAGE plpgsql AS $$
DECLARE
    k text; tid text; t0 timestamptz; i int;
BEGIN
    SELECT api_key, tenant_id::text INTO k, tid FROM bench_keys WHERE n = 1;
    IF what = 'authenticate_user' THEN
        SELECT api_key INTO k FROM bench_user_keys WHERE n = 1;
    END IF;
    t0 := clock_timestamp();
    IF what IN ('authenticate', 'authenticate_user') THEN
        FOR i IN 1 .. calls LOOP PERFORM levqor.authenticate(k); END LOOP;
    ELSE
        FOR i IN 1 .. calls LOOP PERFORM set_config('app.tenant', tid, true); END LOOP;
    END IF;
    RETURN round(extract(epoch FROM clock_timestamp() - t0) * 1e6 / calls, 2);
END $$;
BEGIN;
SELECT pg_temp.time_calls('set_config', 50000) AS set_config_us,
       pg_temp.time_calls('authenticate', 50000) AS authenticate_us,
       pg_temp.time_calls('authenticate_user', 50000) AS authenticate_user_us;
COMMIT;
