# MLflow tracking server with what a Postgres backend and S3 (MinIO) artifacts need.
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir "psycopg2-binary==2.9.13" "boto3>=1.34"
