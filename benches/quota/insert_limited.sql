BEGIN;
SELECT levqor.authenticate(:key);
INSERT INTO items_limited (body) VALUES ('row');
COMMIT;
