#!/usr/bin/env bash
# Start LiteLLM proxy in the foreground against the mock upstream (one uvicorn worker).
#   PORT=4400 UPSTREAM_BASE=http://127.0.0.1:9000/v1 ./run_litellm.sh
# LITELLM (the litellm executable) defaults to bench/.venvs/litellm/bin/litellm, the venv
# that `python bench/run.py --litellm` installs (litellm[proxy]==1.106.2 + opentelemetry-sdk
# + prisma, see ../shared/bench/README.md pitfalls 1-4), else the one on PATH.
# Copied from ../shared/bench/run_litellm.sh; only the LITELLM default differs.
set -euo pipefail
cd "$(dirname "$0")"

export UPSTREAM_BASE="${UPSTREAM_BASE:-http://127.0.0.1:9000/v1}"
export LITELLM_MASTER_KEY="${LITELLM_MASTER_KEY:-sk-bench}"
export LITELLM_LOG="${LITELLM_LOG:-ERROR}"
export LITELLM_LOCAL_MODEL_COST_MAP=True   # skip fetching the cost map from the internet
export DISABLE_SCHEMA_UPDATE=True
unset DATABASE_URL REDIS_HOST REDIS_URL

if [ -z "${LITELLM:-}" ]; then
  if [ -x .venvs/litellm/bin/litellm ]; then LITELLM=.venvs/litellm/bin/litellm; else LITELLM=litellm; fi
fi
exec "$LITELLM" --config litellm.yaml --host 127.0.0.1 \
  --port "${PORT:-4400}" --num_workers "${WORKERS:-1}"
