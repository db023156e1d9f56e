"""The processes of the team stack (Postgres, object store, Prefect and MLflow servers, Dask),
run as plain local processes for trying the team set-up out and for the tests."""
