#!/usr/bin/env bash
# `make run`: the local servers (unless the settings point elsewhere), the schema, the topics,
# a handful of demo orders with the sample among them, then the service in the foreground.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .env ] && { set -a; . ./.env; set +a; }

if [ -z "${DATABASE_URL:-}" ]; then scripts/stack.sh pg-start; fi
if [ -z "${KAFKA_BOOTSTRAP_SERVERS:-}" ]; then scripts/stack.sh kafka-start; fi

.venv/bin/order-viewer migrate
.venv/bin/order-viewer produce --file src/order_viewer/sample_order.json
.venv/bin/order-viewer produce --count 20 --seed 2021
echo "order-viewer: open http://${HTTP_HOST:-127.0.0.1}:${HTTP_PORT:-8081}/?id=b563feb7b2b84b6test"
exec .venv/bin/order-viewer serve
