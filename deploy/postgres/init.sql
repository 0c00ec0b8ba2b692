-- Runs once, when the postgres container initialises an empty data volume
-- (/docker-entrypoint-initdb.d), as POSTGRES_USER (nephrotrack), connected to POSTGRES_DB.
-- One database per service: each service owns its event store, outbox, inbox and projections,
-- and nothing else reads them. The services would create a missing database themselves, but
-- creating them here means the role never needs CREATEDB in production and `nephrotrack migrate`
-- finds them ready.
CREATE DATABASE nephrotrack_outcomes OWNER nephrotrack;
CREATE DATABASE nephrotrack_enrollment OWNER nephrotrack;
CREATE DATABASE nephrotrack_pulse OWNER nephrotrack;
CREATE DATABASE nephrotrack_cells OWNER nephrotrack;
CREATE DATABASE nephrotrack_labs OWNER nephrotrack;
