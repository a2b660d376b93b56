-- (d) levqor with a key issued for a member user: authenticate also finds the
-- user's membership (levqor.members decides the role); no tenant in the SQL.
\set n random(1, 1000)
\set id random(0, 199999)
BEGIN;
SELECT levqor.authenticate(api_key) FROM bench_user_keys WHERE n = :n;
SELECT body FROM items_levqor WHERE id = :id;
SELECT id, body FROM items_levqor ORDER BY id DESC LIMIT 10;
UPDATE items_levqor SET body = body WHERE id = :id;
COMMIT;
