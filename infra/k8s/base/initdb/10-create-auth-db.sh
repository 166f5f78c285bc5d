#!/bin/sh
# Runs once, when the postgres entrypoint initialises an empty data directory.
# A separate database for MLflow's basic-auth user store (used when --app-name basic-auth is on),
# so its tables never share a schema with the tracking store.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -c "CREATE DATABASE mlflow_auth OWNER \"$POSTGRES_USER\""
