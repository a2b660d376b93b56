-- (b) read: authenticate the key; no tenant in the SQL.
\set n random(1, 200)
\set id random(1, 500)
BEGIN;
SELECT levqor.authenticate(api_key) FROM bench_keys WHERE n = :n;
SELECT body FROM items_levqor WHERE id = :id;
SELECT id, body FROM items_levqor ORDER BY id DESC LIMIT 10;
COMMIT;
