# The MLflow tracking server, pinned to the version the workers' client speaks. PostgreSQL backend (psycopg 3),
# proxied artifacts on a volume: clients never get database or storage credentials.
FROM python:3.11.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install "mlflow==3.17.2" "psycopg[binary]==3.3.9" \
    && useradd --create-home --uid 1000 mlflow && mkdir -p /mlartifacts && chown mlflow /mlartifacts
USER mlflow
EXPOSE 5000
CMD ["mlflow", "server"]
