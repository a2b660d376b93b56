-- (a) no RLS: look the key up, then a hand-written WHERE tenant_id = $1.
\set n random(1, 1000)
\set id random(0, 199999)
BEGIN;
SELECT tenant_id AS tid FROM app_api_keys WHERE key_hash = (SELECT sha256(convert_to(api_key, 'UTF8')) FROM bench_keys WHERE n = :n) \gset
SELECT body FROM items_plain WHERE id = :id AND tenant_id = :tid;
SELECT id, body FROM items_plain WHERE tenant_id = :tid ORDER BY id DESC LIMIT 10;
UPDATE items_plain SET body = body WHERE id = :id AND tenant_id = :tid;
COMMIT;
