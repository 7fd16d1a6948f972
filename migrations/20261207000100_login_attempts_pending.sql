-- A login attempt is recorded before its password is checked, so that parallel attempts on one
-- username or address count each other and no more passwords are checked than the limit
-- allows. Until the check ends the attempt is pending: it counts as in progress, not as a
-- failure.
ALTER TABLE login_attempts ADD COLUMN pending boolean NOT NULL DEFAULT false;
