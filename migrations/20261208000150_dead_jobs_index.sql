-- The engine looks for runs whose step, rollback or start job died (its attempts exhausted, a
-- worker killed on every one of them) once a minute: dead jobs are few, and found by this index
-- without reading the finished ones.
CREATE INDEX jobs_dead_idx ON jobs (finished_at) WHERE state = 'dead';
