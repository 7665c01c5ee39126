-- One Postgres for both services: a database each.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
