-- An execution that ended without starting (refused by a gate, rejected, expired or cancelled
-- while it waited) has no duration. Such runs were stored with duration_ms 2147483647 (LEAST
-- ignores a NULL argument), which made execution_stats.avg_duration_ms meaningless; they now
-- keep none.
UPDATE runbook_executions SET duration_ms = NULL WHERE started_at IS NULL;
