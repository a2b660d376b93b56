-- Per-statement server-side cost, (b) hand-written current_setting policy vs (c) levqor,
-- static SQL in PL/pgSQL (cached plans, like pgbench -M prepared), as bench_app so RLS applies.
-- Each column is one pass of 5,000 executions; two passes each, interleaved.
\set QUIET on
SET ROLE bench_app;
CREATE OR REPLACE FUNCTION pg_temp.s_set(stmt text, iters int) RETURNS numeric LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz; b text; v_id bigint;
BEGIN
  t0 := clock_timestamp();
  FOR i IN 1 .. iters LOOP
    v_id := 1200 + i % 200;
    IF stmt = 'ctx' THEN PERFORM set_config('app.tenant', tenant_id::text, true) FROM bench_keys WHERE n = 7;
    ELSIF stmt = 'point' THEN SELECT body INTO b FROM items_setting WHERE id = v_id;
    ELSIF stmt = 'list' THEN PERFORM id, body FROM items_setting ORDER BY id DESC LIMIT 10;
    ELSE UPDATE items_setting SET body = body WHERE id = v_id; END IF;
  END LOOP;
  RETURN round(extract(epoch FROM clock_timestamp() - t0) * 1e6 / iters, 2);
END $$;
CREATE OR REPLACE FUNCTION pg_temp.s_lvq(stmt text, iters int) RETURNS numeric LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz; b text; v_id bigint;
BEGIN
  t0 := clock_timestamp();
  FOR i IN 1 .. iters LOOP
    v_id := 1200 + i % 200;
    IF stmt = 'ctx' THEN PERFORM levqor.authenticate(api_key) FROM bench_keys WHERE n = 7;
    ELSIF stmt = 'point' THEN SELECT body INTO b FROM items_levqor WHERE id = v_id;
    ELSIF stmt = 'list' THEN PERFORM id, body FROM items_levqor ORDER BY id DESC LIMIT 10;
    ELSE UPDATE items_levqor SET body = body WHERE id = v_id; END IF;
  END LOOP;
  RETURN round(extract(epoch FROM clock_timestamp() - t0) * 1e6 / iters, 2);
END $$;
BEGIN;
SELECT set_config('app.tenant', tenant_id::text, true) IS NOT NULL AS ok1 FROM bench_keys WHERE n = 7 \gset
SELECT levqor.authenticate(api_key) IS NOT NULL AS ok2 FROM bench_keys WHERE n = 7 \gset
SELECT s, pg_temp.s_set(s, 5000) AS setting_us, pg_temp.s_lvq(s, 5000) AS levqor_us,
          pg_temp.s_lvq(s, 5000) AS levqor_us2, pg_temp.s_set(s, 5000) AS setting_us2
  FROM unnest(ARRAY['ctx','point','list','update']) s;
COMMIT;
