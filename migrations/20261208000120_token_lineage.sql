-- An API token created with another API token remembers it, so that revoking a token also
-- revokes every token minted with it (a leaked token cannot leave a copy behind). Tokens made
-- with a login session have no parent: logging out ends only the session.
ALTER TABLE auth_tokens
    ADD COLUMN created_with uuid REFERENCES auth_tokens (id) ON DELETE SET NULL;
CREATE INDEX auth_tokens_created_with_idx ON auth_tokens (created_with)
    WHERE created_with IS NOT NULL;
