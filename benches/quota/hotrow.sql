-- The hand-written counter row, same context statement.
BEGIN;
SELECT levqor.authenticate(:key);
UPDATE counters SET used = used + 1 WHERE tenant_id = levqor.current_tenant() RETURNING used;
COMMIT;
