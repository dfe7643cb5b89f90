# The image of the example services: choreo with its Kafka and PostgreSQL clients and its Prometheus metrics.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY choreo ./choreo
COPY services ./services
RUN pip install --no-cache-dir ".[kafka,postgres,metrics]"
ENV CHOREO_STATE=/state
ENTRYPOINT ["choreo"]
