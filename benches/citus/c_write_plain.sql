-- (a) write: look the key up, then hand-written WHERE tenant_id = $1.
\set n random(1, 200)
\set id random(1, 500)
BEGIN;
SELECT tenant_id AS tid FROM app_api_keys WHERE key_hash = (SELECT sha256(convert_to(api_key, 'UTF8')) FROM bench_keys WHERE n = :n) \gset
UPDATE items_plain SET body = md5(body) WHERE tenant_id = :tid AND id = :id;
COMMIT;
