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
# if something already listens on 4222. With LINEGUARD_NATS_NODES=3 it is
# a three-node JetStream cluster on loopback instead (client ports 4222-4224
# or 4232-4234, routes on 6222-6224 or 6232-6234, mutual TLS between the
# nodes), every stream kept on all three (LINEGUARD_STREAM_REPLICAS=3),
# every log copied to them (LINEGUARD_LOG_COPY=true) and
# every service told every node: kill one node and nothing stops. Set
# NATS_URL to use a NATS you run yourself (it must then carry the same
# security: `ticketctl credentials nats-config`, see deploy/nats-cluster/).
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

# nats-server's environment (deploy/nats-server.env): each KEY=VALUE unless
# KEY is already set here.
NATS_ENV=()
while IFS='=' read -r key value; do
  case "$key" in ''|'#'*) continue ;; esac
  NATS_ENV+=("$key=${!key:-$value}")
done < deploy/nats-server.env

# Starts nats-server NAME on client PORT with store STORE and config CONF,
# and waits until it listens.
start_nats_node() {
  env "${NATS_ENV[@]}" "$NATS_BIN" -c "$4" -n "$1" -a 127.0.0.1 -p "$2" -sd "$3" &
  local pid=$!
  pids+=("$pid")
  for _ in $(seq 100); do
    listening "$2" && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "nats-server $1 failed to start on port $2 (see above)" >&2
    exit 1
  fi
}

NODES="${LINEGUARD_NATS_NODES:-1}"
if [ -n "${NATS_URL:-}" ]; then
  echo "using NATS at $NATS_URL" >&2
elif [ "$NODES" = 1 ]; then
  port=4222
  if listening "$port"; then
    port=4223
    echo "something already listens on 4222; starting our NATS on $port" >&2
  fi
  NATS_URL="nats://127.0.0.1:$port"
  {
    cat deploy/nats-server.conf
    "$BIN_DIR/ticketctl" credentials nats-config --dir "$LINEGUARD_CREDENTIALS" \
      --partitions "${LINEGUARD_PARTITIONS:-1}"
  } > "$DATA/nats-server.conf"
  start_nats_node lineguard-local "$port" "$DATA/nats" "$DATA/nats-server.conf"
  echo "started NATS on $NATS_URL (TLS, a user per service; store $DATA/nats)" >&2
elif [ "$NODES" = 3 ]; then
  first=4222
  if listening 4222 || listening 4223 || listening 4224 || listening 6222 || listening 6223 || listening 6224; then
    first=4232
  fi
  routes=()
  for i in 0 1 2; do routes+=(--route "nats-route://127.0.0.1:$((first + 2000 + i))"); done
  urls=()
  for i in 0 1 2; do
    {
      cat deploy/nats-server.conf
      "$BIN_DIR/ticketctl" credentials nats-config --dir "$LINEGUARD_CREDENTIALS" \
        --partitions "${LINEGUARD_PARTITIONS:-1}" --cluster-listen "127.0.0.1:$((first + 2000 + i))" "${routes[@]}"
    } > "$DATA/nats-$((i + 1)).conf"
    start_nats_node "lineguard-$((i + 1))" "$((first + i))" "$DATA/nats-$((i + 1))" "$DATA/nats-$((i + 1)).conf"
    urls+=("nats://127.0.0.1:$((first + i))")
  done
  NATS_URL=$(IFS=,; echo "${urls[*]}")
  export LINEGUARD_STREAM_REPLICAS="${LINEGUARD_STREAM_REPLICAS:-3}"
  # Every log copied to the cluster: a lost data directory comes back.
  export LINEGUARD_LOG_COPY="${LINEGUARD_LOG_COPY:-true}"
  echo "started a three-node NATS cluster on $NATS_URL (TLS; stores $DATA/nats-1..3; streams kept on all three)" >&2
else
  echo "LINEGUARD_NATS_NODES must be 1 or 3, not $NODES" >&2
  exit 2
fi

# Routing adopts the time-limit policy and loads the demo directory (only
# differences from what its log holds are recorded).
declare -A extra=(
  [routing]="--policy deploy/policy.toml --directory deploy/directory.toml"
  [feedback]="--rules deploy/feedback.toml"
)
# Every clock counts working days by this year's holidays and make-up days.
export LINEGUARD_CALENDAR="${LINEGUARD_CALENDAR:-deploy/calendar.toml}"
# With LINEGUARD_PARTITIONS=P (README, "Partitions") every service runs as
# P instances; partition k's four listen on 50051+10k .. 50054+10k, keep
# their data in $DATA/<service> (k = 0) or $DATA/<service>-p<k>, and are
# told where every instance of every partition is: any instance answers any
# call, forwarding it to the partition that owns it.
PARTITIONS="${LINEGUARD_PARTITIONS:-1}"
services=(intake routing dispatch feedback)
peers=()
for ((k = 0; k < PARTITIONS; k++)); do
  suffix=""
  [ "$k" -gt 0 ] && suffix="-p$k"
  for i in 0 1 2 3; do
    peers+=("${services[$i]}$suffix=https://127.0.0.1:$((50051 + 10 * k + i))")
  done
done
# A consumer away longer than the bus keeps messages catches up from the
# source service's own log.
if [ "$PARTITIONS" = 1 ] && [ -n "${LINEGUARD_PEERS:-}" ]; then
  all_peers="$LINEGUARD_PEERS"
else
  all_peers=$(IFS=,; echo "${peers[*]}")
fi
for ((k = 0; k < PARTITIONS; k++)); do
  suffix=""
  [ "$k" -gt 0 ] && suffix="-p$k"
  for i in 0 1 2 3; do
    service=${services[$i]}
    # shellcheck disable=SC2086 # the extra flags are words
    LINEGUARD_PEERS="$all_peers" "$BIN_DIR/lineguard-$service" \
      --data-dir "$DATA/$service$suffix" --nats-url "$NATS_URL" \
      --grpc-addr "127.0.0.1:$((50051 + 10 * k + i))" \
      --partitions "$PARTITIONS" --partition "$k" ${extra[$service]:-} &
    pids+=($!)
  done
done
if [ "$PARTITIONS" = 1 ]; then
  echo "Lineguard is running: intake :50051, routing :50052, dispatch :50053, feedback :50054 (TLS)." >&2
else
  echo "Lineguard is running in $PARTITIONS partitions: partition k's intake, routing, dispatch, feedback on :50051+10k .. :50054+10k (TLS)." >&2
fi
echo "Call it as admin:dev with: export LINEGUARD_CREDENTIALS=$LINEGUARD_CREDENTIALS; ticketctl ... Ctrl-C stops all." >&2
wait -n "${pids[@]}" || true
echo "a process exited; stopping the rest" >&2
