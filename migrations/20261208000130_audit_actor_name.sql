-- The audit log names its actor as well as pointing at them: `user_id` is cleared when the user
-- is deleted (ON DELETE SET NULL), and their trail must still say who did what.
ALTER TABLE audit_log ADD COLUMN username varchar(100);
UPDATE audit_log a SET username = u.username FROM users u WHERE u.id = a.user_id;
CREATE INDEX idx_audit_log_username ON audit_log (lower(username));
