-- The captured output of a `sensitive` step with `capture_output` is stored only sealed
-- (AES-256-GCM envelope bound to the row and column, a JSON object with stdout and stderr), so
-- later steps, on any worker, can read it back while stdout/stderr keep only a mask.
ALTER TABLE step_executions ADD COLUMN output_encrypted text;
