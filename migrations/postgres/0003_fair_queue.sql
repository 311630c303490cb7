-- The fair queue: each project's last claim, by a number every claim raises. A free slot takes the
-- oldest waiting job of the project whose last claim is oldest (src/jobs/store/rules.rs).
CREATE TABLE project_claims (
    project_id text PRIMARY KEY,
    last_claim bigint NOT NULL
);
CREATE INDEX jobs_queued_by_project ON jobs (project_id) WHERE state = 'queued';
