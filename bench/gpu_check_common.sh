# Set-up shared by bench/gpu_check.sh and bench/gpu_check_runsc.sh (sourced, not run):
# a private Redis and a scheduler, their environment, and their stop. The caller sets
# PYTHON, REDIS_SERVER, work (the run's temporary directory) and pids (an array,
# Redis first once started).

# Daemons first, all at once (they finish talking to Redis), Redis (pids[0]) last.
stop_daemons() {
  local p
  for p in "${pids[@]:1}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]:1}" "${pids[0]:-}"; do
    [ -n "$p" ] || continue
    [ "$p" = "${pids[0]}" ] && kill -TERM "$p" 2>/dev/null
    for _ in $(seq 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
}

# The last $1 lines of every log of the run, on stderr (after a failure).
show_logs() {
  local f
  for f in "$work"/*.log; do echo "--- $f" >&2; tail -"$1" "$f" >&2 || true; done
}

# Redis on a free loopback port, the daemons' environment, then a scheduler.
start_control_plane() {
  local port
  port=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$REDIS_SERVER" --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" \
    >"$work/redis.log" 2>&1 &
  pids+=($!)

  export HOTBED_REDIS_URL="redis://127.0.0.1:$port/0" HOTBED_PREFIX="gpucheck" PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
  export HOTBED_REGISTRY_REFRESH_S=0.1 HOTBED_HEARTBEAT_S=0.2 HOTBED_LOG_FORMAT=text
  # This run's own snapshot directory: a worker collects unreferenced snapshots in its
  # directory, and this run's Redis references none of the node's.
  export HOTBED_SNAPSHOT_DIR="$work/snapshots"

  for _ in $(seq 100); do
    "$PYTHON" -c "import redis,sys; sys.exit(0 if redis.Redis.from_url('$HOTBED_REDIS_URL').ping() else 1)" 2>/dev/null && break
    sleep 0.1
  done

  "$PYTHON" -m scheduler >"$work/scheduler.log" 2>&1 &
  pids+=($!)
}
