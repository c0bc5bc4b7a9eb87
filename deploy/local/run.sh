#!/usr/bin/env bash
# Porter's distributed mode on this machine, as real processes: redis-server (AOF on, loopback
# only), N `porter worker` processes on the cpu queue, the status API (`porter serve`,
# http://127.0.0.1:8080/v1/jobs) and the scheduler of re-exports (`porter beat`, celery-redbeat;
# --no-beat leaves it out). Runs in the foreground; Ctrl-C stops all. Workers that exit are
# restarted; any other process exiting stops the stack.
#
#   deploy/local/run.sh [--workers N] [--concurrency C] [--port P] [--api-port A] [--dir DIR]
#                       [--no-beat] [--sources LIST] [--outputs LIST] [--allow-any-location]
#
# Where jobs may read and write (docs/SECURITY.md): --sources / --outputs (comma-separated
# absolute paths and s3://bucket[/prefix]; default: PORTER_ALLOWED_SOURCES / _OUTPUTS from the
# environment, else ./demo for both), or --allow-any-location for no lists. Job records are sealed
# with PORTER_JOB_SECRET (taken from the environment, else a random one made for this stack).
# PORTER_REDIS_PASSWORD, if set, makes Redis require it (AUTH). The API's job-changing calls also
# need PORTER_API_TOKEN in the environment when the stack starts.
#
# Then, from another shell (the client settings are in DIR/client.env, readable by you only):
#   set -a; . .porter-local/client.env; set +a
#   .venv/bin/porter submit megatron-trtllm SOURCE DEST --tp 4 --wait
#   .venv/bin/porter status JOB ; .venv/bin/porter jobs
set -euo pipefail
cd "$(dirname "$0")/../.."

workers=2 concurrency=1 port=6390 api_port=8080 dir=.porter-local beat=1 any=0
sources=${PORTER_ALLOWED_SOURCES:-$(pwd)/demo} outputs=${PORTER_ALLOWED_OUTPUTS:-$(pwd)/demo}
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) workers=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --api-port) api_port=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --no-beat) beat=0; shift ;;
    --sources) sources=$2; shift 2 ;;
    --outputs) outputs=$2; shift 2 ;;
    --allow-any-location) any=1; shift ;;
    *) echo "usage: $0 [--workers N] [--concurrency C] [--port P] [--api-port A] [--dir DIR] [--no-beat] [--sources LIST] [--outputs LIST] [--allow-any-location]" >&2; exit 2 ;;
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

# Loopback only. With PORTER_REDIS_PASSWORD, Redis also requires AUTH (the password goes to the
# server through a config file on stdin, never on a command line that `ps` shows).
auth=""
if [ -n "${PORTER_REDIS_PASSWORD:-}" ]; then
  auth=":$PORTER_REDIS_PASSWORD@"
  export REDISCLI_AUTH=$PORTER_REDIS_PASSWORD
fi
{ [ -z "${PORTER_REDIS_PASSWORD:-}" ] || echo "requirepass \"$PORTER_REDIS_PASSWORD\""; } |
  redis-server - --port "$port" --bind 127.0.0.1 --dir "$(cd "$dir/redis" && pwd)" \
  --appendonly yes --maxmemory-policy noeviction >"$dir/logs/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
export PORTER_REDIS_URL="redis://${auth}127.0.0.1:$port/0"
# Where workers may read and write, and the key that seals job records (docs/SECURITY.md).
if [ "$any" = 1 ]; then
  export PORTER_ALLOW_ANY_LOCATION=1
  unset PORTER_ALLOWED_SOURCES PORTER_ALLOWED_OUTPUTS
  where="anywhere this user can read and write (--allow-any-location)"
else
  export PORTER_ALLOWED_SOURCES=$sources PORTER_ALLOWED_OUTPUTS=$outputs
  where="sources $sources; outputs $outputs (--sources/--outputs to change)"
fi
export PORTER_JOB_SECRET=${PORTER_JOB_SECRET:-$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')}
client_env="$dir/client.env"
(
  umask 077
  { echo "PORTER_REDIS_URL=$PORTER_REDIS_URL"; echo "PORTER_JOB_SECRET=$PORTER_JOB_SECRET"
    env | grep -E '^PORTER_(ALLOWED_SOURCES|ALLOWED_OUTPUTS|ALLOW_ANY_LOCATION)=' || true
  } >"$client_env"
)
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
echo "jobs may read and write: $where" >&2
if [ -z "${PORTER_API_TOKEN:-}" ]; then
  echo "the API's job-changing calls (POST /v1/jobs, cancel, retry) are off: start with" \
    "PORTER_API_TOKEN=... in the environment to turn them on (hooks: PORTER_HOOK_SECRET)" >&2
fi
echo "client settings: set -a; . $client_env; set +a" >&2
wait -n "${pids[@]}"
echo "a process exited; see $dir/logs" >&2
