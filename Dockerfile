# The image of the example services: choreo with its Kafka client and its Prometheus metrics.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY choreo ./choreo
COPY services ./services
RUN pip install --no-cache-dir ".[kafka,metrics]"
ENV CHOREO_STATE=/state
ENTRYPOINT ["choreo"]
