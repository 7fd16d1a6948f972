-- An attempt row is inserted `running` and updated exactly once, when it finishes; none of the
-- columns that update changes is indexed. With free space left in each page the update is a
-- heap-only tuple update (no new index entries); at the default fill factor the page is usually
-- full of newer attempts by then, and every finish added an entry to each index.
ALTER TABLE step_executions SET (fillfactor = 50);

-- The schema's (execution_id, step_order, retry_attempt) index serves the slot lookups (an
-- execution has few attempt rows); one index fewer to maintain per attempt.
DROP INDEX idx_step_executions_lookup;
