-- The MLflow server's backend store lives beside the job ledger, in its own database.
CREATE DATABASE mlflow;
