#!/usr/bin/env bash
# Runs the whole backend in the foreground: NATS with JetStream plus the four
# services on their default ports (intake 50051, routing 50052, dispatch
# 50053, feedback 50054), data under .lineguard/. Ctrl-C stops everything.
#
# Development credentials are made once (.lineguard/credentials): a CA, each
# service's certificate, the NATS server's, admin:dev, intake_system:dev, a
# token key. Every gRPC call and every NATS connection is TLS and
# authenticated; NATS holds each service to its own subjects.
#
# Our own NATS is started with deploy/nats-server.conf (fsync before ack)
# plus the TLS and users made from the credentials, on port 4222, or 4223
# if something already listens on 4222. Set NATS_URL to use a NATS you run
# yourself (it must then carry the same security: `ticketctl credentials
# nats-config`).
set -euo pipefail
cd "$(dirname "$0")/.."
NATS_BIN=$(bash deploy/setup.sh)
export PATH="$HOME/.cargo/bin:$PATH"

echo "building the services (release)..." >&2
cargo build --release --bins -q
BIN_DIR="${CARGO_TARGET_DIR:-target}/release"

DATA=.lineguard
mkdir -p "$DATA"
"$BIN_DIR/ticketctl" credentials init --dir "$DATA/credentials" >/dev/null
export LINEGUARD_CREDENTIALS="${LINEGUARD_CREDENTIALS:-$PWD/$DATA/credentials}"
export LINEGUARD_ACCESS_POLICY="${LINEGUARD_ACCESS_POLICY:-$PWD/deploy/access.toml}"

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo "stopping..." >&2
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if [ -n "${NATS_URL:-}" ]; then
  echo "using NATS at $NATS_URL" >&2
else
  port=4222
  if listening "$port"; then
    port=4223
    echo "something already listens on 4222; starting our NATS on $port" >&2
  fi
  NATS_URL="nats://127.0.0.1:$port"
  {
    cat deploy/nats-server.conf
    "$BIN_DIR/ticketctl" credentials nats-config --dir "$LINEGUARD_CREDENTIALS"
  } > "$DATA/nats-server.conf"
  "$NATS_BIN" -c "$DATA/nats-server.conf" -a 127.0.0.1 -p "$port" -sd "$DATA/nats" &
  nats_pid=$!
  pids+=("$nats_pid")
  for _ in $(seq 100); do
    listening "$port" && break
    kill -0 "$nats_pid" 2>/dev/null || break
    sleep 0.1
  done
  if ! kill -0 "$nats_pid" 2>/dev/null; then
    echo "nats-server failed to start on port $port (see above)" >&2
    exit 1
  fi
  echo "started NATS on $NATS_URL (TLS, a user per service; store $DATA/nats)" >&2
fi

# Routing adopts the time-limit policy and loads the demo directory (only
# differences from what its log holds are recorded).
declare -A extra=(
  [routing]="--policy deploy/policy.toml --directory deploy/directory.toml"
  [feedback]="--rules deploy/feedback.toml"
)
# Every clock counts working days by this year's holidays and make-up days.
export LINEGUARD_CALENDAR="${LINEGUARD_CALENDAR:-deploy/calendar.toml}"
# A consumer away longer than the bus keeps messages catches up from the
# source service's own log.
export LINEGUARD_PEERS="${LINEGUARD_PEERS:-intake=https://127.0.0.1:50051,routing=https://127.0.0.1:50052,dispatch=https://127.0.0.1:50053,feedback=https://127.0.0.1:50054}"
for service in intake routing dispatch feedback; do
  # shellcheck disable=SC2086 # the extra flags are words
  "$BIN_DIR/lineguard-$service" --data-dir "$DATA/$service" --nats-url "$NATS_URL" ${extra[$service]:-} &
  pids+=($!)
done
echo "Lineguard is running: intake :50051, routing :50052, dispatch :50053, feedback :50054 (TLS)." >&2
echo "Call it as admin:dev with: export LINEGUARD_CREDENTIALS=$LINEGUARD_CREDENTIALS; ticketctl ... Ctrl-C stops all." >&2
wait -n "${pids[@]}" || true
echo "a process exited; stopping the rest" >&2
