-- Secret variables of an execution (named like secrets, or listed in the runbook's
-- config.secret_vars) are never stored in plaintext: context_vars keeps their names with a mask,
-- and this column holds one AES-256-GCM envelope (bound to the row and column) of a JSON object
-- of their values, opened only by the worker that runs the steps.
ALTER TABLE runbook_executions ADD COLUMN secret_vars_encrypted text;
