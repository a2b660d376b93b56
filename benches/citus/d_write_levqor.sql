-- (b) write: authenticate the key; no tenant in the SQL.
\set n random(1, 200)
\set id random(1, 500)
BEGIN;
SELECT levqor.authenticate(api_key) FROM bench_keys WHERE n = :n;
UPDATE items_levqor SET body = md5(body) WHERE id = :id;
COMMIT;
