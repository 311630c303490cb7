-- The position a waiting job's status shows, so that a queue change reads the queue's order and
-- positions without parsing every waiting job's status.
ALTER TABLE jobs ADD COLUMN queue_position integer;
UPDATE jobs SET queue_position = (status::jsonb ->> 'queue_position')::integer WHERE state = 'queued';
