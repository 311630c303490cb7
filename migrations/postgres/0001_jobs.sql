-- The job store shared by every node of a cluster. Statuses are kept as the JSON they were
-- published with; the columns beside them are what the rules query.
CREATE TABLE jobs (
    job_id uuid PRIMARY KEY,
    project_id text NOT NULL,
    state text NOT NULL,
    seq bigint NOT NULL,
    status text NOT NULL,
    settings text NOT NULL,
    stems text NOT NULL,
    idempotency_key text,
    webhook text,
    -- Submission order: the queue is served oldest first, and a rescued job keeps its place.
    queue_order bigint GENERATED ALWAYS AS IDENTITY,
    -- Runs begun (the fence of the current one) and runs handed back by a node shutting down.
    attempts integer NOT NULL DEFAULT 0,
    handed_back integer NOT NULL DEFAULT 0,
    lease_owner uuid,
    lease_expires_at timestamptz
);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (project_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_queue ON jobs (queue_order) WHERE state = 'queued';
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE lease_owner IS NOT NULL;

-- Every change of every job, in commit order (writers take a lock before appending).
CREATE TABLE job_events (
    cursor bigserial PRIMARY KEY,
    job_id uuid NOT NULL,
    status text NOT NULL
);
CREATE INDEX job_events_job ON job_events (job_id, cursor);

-- The webhook outbox. Times are unix milliseconds from the sending node's clock.
CREATE TABLE webhook_deliveries (
    id text PRIMARY KEY,
    job_id text NOT NULL,
    url text NOT NULL,
    message_type text NOT NULL,
    body text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at bigint,
    outcome text,
    created_at bigint NOT NULL,
    claimed_until bigint
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE TABLE webhook_attempts (
    delivery_id text NOT NULL,
    job_id text NOT NULL,
    attempt integer NOT NULL,
    attempted_at bigint NOT NULL,
    http_status integer,
    error text,
    next_attempt_at bigint,
    PRIMARY KEY (delivery_id, attempt)
);
CREATE INDEX webhook_attempts_job ON webhook_attempts (job_id);

CREATE TABLE server_settings (key text PRIMARY KEY, value text NOT NULL);
