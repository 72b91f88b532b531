# syntax=docker/dockerfile:1
# Tally's image: `tally serve` by default; the same image runs `tally migrate`, `tally seed` and
# `tally projector`. Configuration comes from the environment (README, "Configuration"); nothing
# secret is baked in. The embedded PostgreSQL is not installed: set DATABASE_URL.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY domain domain
COPY commands commands
COPY projections projections
COPY api api
COPY bench bench
# Wheels for Tally and every runtime dependency (all ship manylinux wheels: no compiler needed).
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim AS runtime
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin tally
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels tally && rm -rf /wheels
COPY migrations /app/migrations
ENV TALLY_MIGRATIONS_DIR=/app/migrations \
    HOST=0.0.0.0 \
    PORT=8000 \
    TALLY_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
WORKDIR /app
USER tally
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ.get('PORT', '8000'), timeout=2)"]
# SIGTERM: the server stops accepting, finishes in-flight requests, then exits.
STOPSIGNAL SIGTERM
CMD ["tally", "serve"]
