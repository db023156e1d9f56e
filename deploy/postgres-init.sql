-- The image creates the `finpipe` database (POSTGRES_DB: finpipe's locks); the servers get
-- their own, as `finpipe stack` creates them (stack.py: DATABASES).
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
