-- OAuth2 (§9). Clients added with `xpud client add`; their secrets as argon2 PHC
-- strings, never the secret itself. Signing keys for the access tokens (HS256): the
-- newest unretired key signs; a rotated key still verifies until `retire_at_ms`.
CREATE TABLE clients      (id TEXT PRIMARY KEY, secret_hash TEXT NOT NULL, scopes TEXT NOT NULL, created_ms INTEGER NOT NULL);
CREATE TABLE signing_keys (kid TEXT PRIMARY KEY, secret BLOB NOT NULL, created_ms INTEGER NOT NULL, retire_at_ms INTEGER);
