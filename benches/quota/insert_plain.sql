BEGIN;
SELECT levqor.authenticate(:key);
INSERT INTO items_plain (body) VALUES ('row');
COMMIT;
