-- (c) levqor: authenticate the key every transaction; no tenant in the SQL.
\set n random(1, 1000)
\set id random(0, 199999)
BEGIN;
SELECT levqor.authenticate(api_key) FROM bench_keys WHERE n = :n;
SELECT body FROM items_levqor WHERE id = :id;
SELECT id, body FROM items_levqor ORDER BY id DESC LIMIT 10;
UPDATE items_levqor SET body = body WHERE id = :id;
COMMIT;
