-- tokend's PostgreSQL schema, version 1. Every table is prefixed `tokend_` so the store can
-- share a database with other applications. Later versions append their own statements after
-- this file (MIGRATIONS in mod.rs); this file itself never changes once released.

CREATE TABLE tokend_credential (
    name            text PRIMARY KEY,
    provider        text NOT NULL,
    access_token    text NOT NULL,
    refresh_token   text,
    token_type      text NOT NULL,
    scope           text,
    expires_in      bigint,
    created_at      bigint NOT NULL,
    expires_at      bigint,
    -- The fence: every rotation commit is `… WHERE generation = <the generation spent>`.
    generation      bigint NOT NULL,
    status          text NOT NULL CHECK (status IN ('active', 'needs_reauth', 'revoked')),
    last_error      text,
    last_refresh_at bigint,
    updated_at      bigint NOT NULL
);

CREATE TABLE tokend_attempt (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    credential      text NOT NULL,
    from_generation bigint NOT NULL,
    spent_fp        text,
    holder          text NOT NULL,
    -- hostname/boot id of the node that sent the request: a pid means something only there.
    node            text NOT NULL,
    -- The server process of the session that began the attempt: while it exists the attempt may
    -- still land (ARCHITECTURE.md, "Fleet"); once it is gone the attempt is provably over.
    backend_pid     integer NOT NULL,
    started_at_ms   bigint NOT NULL,
    finished_at_ms  bigint,
    result          text
);
CREATE INDEX tokend_attempt_open ON tokend_attempt (credential) WHERE finished_at_ms IS NULL;

CREATE TABLE tokend_lease (
    credential      text PRIMARY KEY,
    holder          text NOT NULL,
    node            text NOT NULL,
    pid             integer NOT NULL,
    -- Computed by the server (now() + ttl), so skewed node clocks cannot overlap leases.
    deadline        timestamptz NOT NULL
);

-- Answers that lost the fenced commit (another holder advanced the generation first): kept,
-- never silently dropped, for an operator to inspect.
CREATE TABLE tokend_rescue (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    credential      text NOT NULL,
    from_generation bigint NOT NULL,
    found_generation bigint,
    node            text NOT NULL,
    answer          jsonb NOT NULL,
    saved_at        timestamptz NOT NULL DEFAULT now()
);
