-- The fair queue: each project's last claim, by a number every claim raises. A free slot takes the
-- oldest waiting job of the project whose last claim is oldest (src/jobs/store/rules.rs).
CREATE TABLE project_claims (
    project_id text PRIMARY KEY,
    last_claim bigint NOT NULL
);
CREATE INDEX jobs_queued_by_project ON jobs (project_id) WHERE state = 'queued';

-- The bytes of each project's stems, for --project-quota-gb: an upload reserves its size here
-- before its stem is stored (refused past the quota) and records its stem's bytes once stored;
-- a delete gives them back, once, whoever deletes. A project's rows are made from its stems as
-- listed the first time an upload needs them.
CREATE TABLE project_usage (
    project_id text PRIMARY KEY,
    bytes bigint NOT NULL
);
CREATE TABLE stem_usage (
    stem_id text PRIMARY KEY,
    project_id text NOT NULL,
    bytes bigint NOT NULL
);
