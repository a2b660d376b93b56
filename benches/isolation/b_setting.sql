-- (b) hand-written policy on current_setting('app.tenant'), set with set_config.
\set n random(1, 1000)
\set id random(0, 199999)
BEGIN;
SELECT set_config('app.tenant', tenant_id::text, true) FROM bench_keys WHERE n = :n;
SELECT body FROM items_setting WHERE id = :id;
SELECT id, body FROM items_setting ORDER BY id DESC LIMIT 10;
UPDATE items_setting SET body = body WHERE id = :id;
COMMIT;
