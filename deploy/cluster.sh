#!/bin/sh
# `make cluster`: the cluster on one machine with Docker Compose — three NATS JetStream nodes with
# the accounts of deploy/nats, every stream and the key bucket in three replicas, two replicas of
# every service behind the front door, PostgreSQL and the monitoring (deploy/README.md, "The
# cluster on one machine"). Secrets missing from .env (API keys, NATS passwords, the route
# password) are generated into it first (mode 0600) and reused on every later run.
set -eu
cd "$(dirname "$0")/.."

umask 077
touch .env
secret() { python3 -c 'import secrets; print(secrets.token_hex(24))'; }
keep() { grep -q "^$1=" .env || echo "$1=$(secret)" >> .env; }
for role in STAFF ANALYST OPERATOR LAB; do keep "NEPHROTRACK_${role}_KEY"; done
for user in OUTCOMES ENROLLMENT PULSE CELLS LABS LAB OPERATOR SYS ROUTE; do keep "NATS_${user}_PASSWORD"; done

exec docker compose -f docker-compose.yml -f deploy/compose.nats-auth.yml -f deploy/nats/cluster/compose.yml \
    up -d --build "$@"
