# taskgate with every extra: `taskgate serve`, Celery and RQ workers, the examples.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md hatch_build.py ./
COPY contract ./contract
COPY scripts ./scripts
COPY src ./src
RUN pip install --no-cache-dir '.[all]'
COPY examples ./examples
ENV PYTHONUNBUFFERED=1 \
    TASKGATE_POLICIES=/app/examples/compose/policies.yaml
EXPOSE 50051
CMD ["taskgate", "--help"]
