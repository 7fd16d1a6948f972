-- Usernames, emails and server names are unique regardless of case: `Alice` and `alice` would be
-- two accounts for one person, and `web-1` and `WEB-1` two entries for one host. A database that
-- already holds such a pair is refused with the names, to be renamed before upgrading.
DO $$
DECLARE
    pairs text;
BEGIN
    SELECT string_agg(DISTINCT username, ', ') INTO pairs FROM users u
     WHERE EXISTS (SELECT 1 FROM users o WHERE lower(o.username) = lower(u.username) AND o.id <> u.id);
    IF pairs IS NOT NULL THEN
        RAISE EXCEPTION 'usernames that differ only in case: %; rename all but one of each before upgrading', pairs;
    END IF;
    SELECT string_agg(DISTINCT email, ', ') INTO pairs FROM users u
     WHERE EXISTS (SELECT 1 FROM users o WHERE lower(o.email) = lower(u.email) AND o.id <> u.id);
    IF pairs IS NOT NULL THEN
        RAISE EXCEPTION 'emails that differ only in case: %; change all but one of each before upgrading', pairs;
    END IF;
    SELECT string_agg(DISTINCT name, ', ') INTO pairs FROM server_credentials s
     WHERE EXISTS (SELECT 1 FROM server_credentials o WHERE lower(o.name) = lower(s.name) AND o.id <> s.id);
    IF pairs IS NOT NULL THEN
        RAISE EXCEPTION 'server names that differ only in case: %; rename all but one of each before upgrading', pairs;
    END IF;
END
$$;

CREATE UNIQUE INDEX users_lower_username_key ON users (lower(username));
CREATE UNIQUE INDEX users_lower_email_key ON users (lower(email));
CREATE UNIQUE INDEX server_credentials_lower_name_key ON server_credentials (lower(name));
