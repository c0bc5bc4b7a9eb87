#!/usr/bin/env bash
# Porter's distributed mode on this machine, as real processes: redis-server (AOF on, loopback
# only), N `porter worker` processes on the cpu queue, the status API (`porter serve`,
# http://127.0.0.1:8080/v1/jobs) and the scheduler of re-exports (`porter beat`, celery-redbeat;
# --no-beat leaves it out). Runs in the foreground; Ctrl-C stops all. Workers that exit are
# restarted; any other process exiting stops the stack.
#
#   deploy/local/run.sh [--workers N] [--concurrency C] [--port P] [--api-port A] [--dir DIR]
#                       [--no-beat]
#
# Then, from another shell (same PORTER_REDIS_URL, and boto3's AWS_* settings for s3:// URIs):
#   export PORTER_REDIS_URL=redis://127.0.0.1:6390/0
#   .venv/bin/porter submit megatron-trtllm SOURCE DEST --tp 4 --wait
#   .venv/bin/porter status JOB ; .venv/bin/porter jobs
set -euo pipefail
cd "$(dirname "$0")/../.."

workers=2 concurrency=1 port=6390 api_port=8080 dir=.porter-local beat=1
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) workers=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --api-port) api_port=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --no-beat) beat=0; shift ;;
    *) echo "usage: $0 [--workers N] [--concurrency C] [--port P] [--api-port A] [--dir DIR] [--no-beat]" >&2; exit 2 ;;
  esac
done
command -v redis-server >/dev/null || { echo "redis-server is not installed (apt-get install redis-server)" >&2; exit 1; }
[ -x .venv/bin/porter ] || { echo "no .venv/bin/porter: run the README's install first" >&2; exit 1; }

mkdir -p "$dir/redis" "$dir/logs"
pids=()
stop() {
  trap - INT TERM EXIT
  echo "stopping ${#pids[@]} process(es)" >&2
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap stop INT TERM EXIT

# Run "$@" again whenever it exits, as a supervisor would: the pool watchdog stops a worker whose
# prefork pool is wedged (tasks/pool_watchdog.py) and relies on being restarted.
supervise() {
  local child status
  trap 'kill "$child" 2>/dev/null; wait "$child" 2>/dev/null; exit 0' INT TERM
  while true; do
    "$@" &
    child=$!
    status=0
    wait "$child" || status=$?
    echo "[run.sh $(date -Is)] exited with status $status; restarting in 1 s" >&2
    sleep 1
  done
}

redis-server --port "$port" --bind 127.0.0.1 --dir "$(cd "$dir/redis" && pwd)" \
  --appendonly yes --maxmemory-policy noeviction >"$dir/logs/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
export PORTER_REDIS_URL="redis://127.0.0.1:$port/0"
for i in $(seq "$workers"); do
  supervise .venv/bin/porter worker --queues cpu --concurrency "$concurrency" \
    >>"$dir/logs/worker-$i.log" 2>&1 &
  pids+=($!)
done
.venv/bin/porter serve --port "$api_port" >"$dir/logs/api.log" 2>&1 &
pids+=($!)
started="status API on http://127.0.0.1:$api_port/v1/jobs"
if [ "$beat" = 1 ]; then
  # One beat is enough here; a second would wait on redbeat's lock in Redis as a standby.
  .venv/bin/porter beat --loglevel INFO >"$dir/logs/beat.log" 2>&1 &
  pids+=($!)
  started="$started, porter beat"
fi
echo "redis-server on 127.0.0.1:$port (AOF in $dir/redis), $workers worker(s)," \
  "$started; logs in $dir/logs" >&2
echo "export PORTER_REDIS_URL=$PORTER_REDIS_URL" >&2
wait -n "${pids[@]}"
echo "a process exited; see $dir/logs" >&2
