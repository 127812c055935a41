"""The job ledger: a leaf package (SQLAlchemy + stdlib only) shared by the API, the workers and the migrations."""
