-- levqor: the counter in shared memory.
BEGIN;
SELECT levqor.authenticate(:key);
SELECT levqor.consume(:metric);
COMMIT;
