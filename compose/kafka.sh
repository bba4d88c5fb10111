#!/usr/bin/env bash
# Runs a local Apache Kafka cluster of one or three KRaft nodes for Chartlog's tests, without
# Docker and on 127.0.0.1 only. The jars come from Maven Central through mvn (kafka-pom.xml).
# Run `kafka.sh help` for the subcommands and the environment variables.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
readonly POM=$SCRIPT_DIR/kafka-pom.xml
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM")
readonly KAFKA_VERSION

readonly RUN_DIR=${CHARTLOG_KAFKA_RUN_DIR:-${TMPDIR:-/tmp}/chartlog-kafka}
readonly CACHE_DIR=${CHARTLOG_KAFKA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/chartlog-kafka}
readonly LIB_DIR=$CACHE_DIR/kafka-$KAFKA_VERSION/libs
readonly STATE_FILE=$RUN_DIR/cluster.env
readonly DEFAULT_PORT=19092
readonly BROKER_HEAP=${CHARTLOG_KAFKA_HEAP:-512m}
# Seconds that a broker gets to finish its controlled shutdown after SIGTERM before SIGKILL.
readonly STOP_TIMEOUT=${CHARTLOG_KAFKA_STOP_TIMEOUT:-30}

if [[ -n ${JAVA_HOME:-} ]]; then
    readonly JAVA=$JAVA_HOME/bin/java
else
    readonly JAVA=java
fi

usage() {
    cat <<EOF
Usage: kafka.sh COMMAND [OPTIONS]

Runs Apache Kafka $KAFKA_VERSION in KRaft mode on 127.0.0.1 for tests, without Docker.

Commands:
  fetch                       Copy the Kafka jars from Maven Central (through ~/.m2) into
                              $LIB_DIR.
  start [--brokers 1|3] [--dir DIR]
                              Format storage and start 1 (default) or 3 nodes in the
                              background. Data goes to a new temporary folder in the run
                              directory, or to DIR. DIR may contain data kept by an earlier
                              'stop --keep-data', and the nodes then resume with it.
  wait [--timeout SECONDS]    Wait until every running node serves client requests
                              (default 90 s).
  bootstrap                   Print the bootstrap servers of the cluster.
  status                      Print each node's state, pid, port and log file.
  stop [--keep-data]          Stop every node, and delete the temporary data folder unless
                              --keep-data is given. A folder given with --dir is never
                              deleted.
  stop-broker N               Stop node N (1-based) and keep its data.
  start-broker N              Start node N again with its data. Run 'wait' next.
  run-class CLASS [ARGS...]   Run a Java class from the Kafka jars, such as
                              org.apache.kafka.tools.TopicCommand.
  help                        Print this text.

Environment:
  CHARTLOG_KAFKA_PORT          First client port (default $DEFAULT_PORT). Node N listens for
                               clients on PORT+N-1 and for controllers on PORT+BROKERS+N-1.
  CHARTLOG_KAFKA_RUN_DIR       Run directory with configs, pid files and logs
                               (default \${TMPDIR:-/tmp}/chartlog-kafka, now $RUN_DIR).
  CHARTLOG_KAFKA_CACHE_DIR     Folder for the copied jars
                               (default \${XDG_CACHE_HOME:-\$HOME/.cache}/chartlog-kafka).
  CHARTLOG_KAFKA_HEAP          Maximum Java heap of each node (default 512m).
  CHARTLOG_KAFKA_STOP_TIMEOUT  Seconds between SIGTERM and SIGKILL on stop and stop-broker
                               (default 30).
  JAVA_HOME                    Java 17 or newer to use instead of the java on PATH.
EOF
}

log() {
    echo "kafka.sh: $*" >&2
}

die() {
    echo "kafka.sh: error: $*" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------------
# Jars

check_java() {
    command -v "$JAVA" >/dev/null || die "java not found; install Java 17 or newer, or set JAVA_HOME"

    local version_line major
    version_line=$("$JAVA" -version 2>&1 | head -n 1)
    major=$(sed -E 's/.*version "(1\.)?([0-9]+).*/\2/' <<<"$version_line")
    if ! [[ $major =~ ^[0-9]+$ ]] || ((major < 17)); then
        die "Kafka $KAFKA_VERSION needs Java 17 or newer, found: $version_line"
    fi
}

# Copies the jars that kafka-pom.xml names into LIB_DIR. A stamp file with the digest of the pom
# marks a complete copy, so a second run does nothing.
fetch() {
    local pom_digest
    pom_digest=$(sha256sum "$POM" | cut -d ' ' -f 1)
    if [[ -f $LIB_DIR/.pom-sha256 && $(<"$LIB_DIR/.pom-sha256") == "$pom_digest" ]]; then
        log "Kafka $KAFKA_VERSION jars are already in $LIB_DIR"
        return
    fi

    command -v mvn >/dev/null || die "mvn not found; install Maven 3.8 or newer"
    check_java
    mkdir -p "$CACHE_DIR"

    local staging fetch_log
    staging=$(mktemp -d "$CACHE_DIR/libs.XXXXXX")
    fetch_log=$CACHE_DIR/fetch.log
    local copy_jars=(mvn -B -q -f "$POM" dependency:copy-dependencies
        -DincludeScope=runtime -DoutputDirectory="$staging")

    # Offline first: when ~/.m2 already has every jar, mvn needs no network at all.
    if ! "${copy_jars[@]}" -o >"$fetch_log" 2>&1; then
        log "downloading Kafka $KAFKA_VERSION jars from Maven Central into ~/.m2"
        if ! "${copy_jars[@]}" >>"$fetch_log" 2>&1; then
            rm -rf "$staging"
            die "mvn failed to fetch the Kafka $KAFKA_VERSION jars; see $fetch_log"
        fi
    fi

    [[ -f $staging/kafka_2.13-$KAFKA_VERSION.jar ]] ||
        die "mvn finished but kafka_2.13-$KAFKA_VERSION.jar is missing from $staging; see $fetch_log"
    echo "$pom_digest" >"$staging/.pom-sha256"
    rm -rf "$LIB_DIR"
    mkdir -p "$(dirname "$LIB_DIR")"
    mv "$staging" "$LIB_DIR"
    log "copied $(find "$LIB_DIR" -name '*.jar' | wc -l) jars of Kafka $KAFKA_VERSION into $LIB_DIR"
}

require_jars() {
    [[ -f $LIB_DIR/.pom-sha256 ]] || die "Kafka jars not found in $LIB_DIR; run: kafka.sh fetch"
}

# Java command line of the short-lived Kafka tools. The small heap, serial GC and C1-only JIT keep
# their start-up cheap on a machine that is also running the brokers.
readonly TOOL_JAVA=("$JAVA" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$SCRIPT_DIR/log4j2-tools.properties"
    -cp "$LIB_DIR/*")

run_tool() {
    "${TOOL_JAVA[@]}" "$@"
}

# ---------------------------------------------------------------------------------------------
# Cluster state
#
# STATE_FILE stores BROKERS, BASE_PORT, DATA_DIR, DATA_DIR_IS_TEMPORARY and CLUSTER_ID of the
# cluster that 'start' set up. Node N keeps its server.properties, kafka.pid and kafka.log in
# RUN_DIR/node-N and its data in DATA_DIR/node-N.

load_state() {
    [[ -f $STATE_FILE ]] || die "no cluster has been started from $RUN_DIR; run: kafka.sh start"
    # shellcheck source=/dev/null
    source "$STATE_FILE"
}

write_state() {
    {
        printf 'BROKERS=%q\n' "$BROKERS"
        printf 'BASE_PORT=%q\n' "$BASE_PORT"
        printf 'DATA_DIR=%q\n' "$DATA_DIR"
        printf 'DATA_DIR_IS_TEMPORARY=%q\n' "$DATA_DIR_IS_TEMPORARY"
        printf 'CLUSTER_ID=%q\n' "$CLUSTER_ID"
    } >"$STATE_FILE"
}

# Takes the run directory's lock, so that two callers (such as parallel tests) never start or stop
# nodes at the same time. The lock is released when the script exits.
lock_run_dir() {
    mkdir -p "$RUN_DIR"
    exec 9>"$RUN_DIR/lock"
    flock -w 300 9 || die "timed out after 300 s waiting for the lock on $RUN_DIR/lock"
}

client_port() {
    echo $((BASE_PORT + $1 - 1))
}

controller_port() {
    echo $((BASE_PORT + BROKERS + $1 - 1))
}

node_dir() {
    echo "$RUN_DIR/node-$1"
}

bootstrap_servers() {
    local node servers=()
    for ((node = 1; node <= BROKERS; node++)); do
        servers+=("127.0.0.1:$(client_port "$node")")
    done
    local IFS=,
    echo "${servers[*]}"
}

validate_node() {
    if ! [[ $1 =~ ^[0-9]+$ ]] || (($1 < 1 || $1 > BROKERS)); then
        die "invalid node number '$1'; the cluster has nodes 1 to $BROKERS"
    fi
}

# A process counts as alive unless it is gone or a zombie.
pid_alive() {
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]]
}

# Prints the pid of node N if that node is running. The command line is checked as well, so a
# stale pid file whose pid was reused by another process does not count.
node_pid() {
    local pid_file pid
    pid_file=$(node_dir "$1")/kafka.pid
    [[ -f $pid_file ]] || return 1
    pid=$(<"$pid_file")
    [[ $pid =~ ^[0-9]+$ ]] && pid_alive "$pid" || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "kafka.Kafka $(node_dir "$1")/server.properties" ||
        return 1
    echo "$pid"
}

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

check_ports_free() {
    local port
    for port in "$@"; do
        if port_in_use "$port"; then
            die "port 127.0.0.1:$port is in use; stop what listens there or set CHARTLOG_KAFKA_PORT"
        fi
    done
}

# ---------------------------------------------------------------------------------------------
# Nodes

write_server_properties() {
    local node=$1 replication_factor min_insync_replicas voters=() other
    if ((BROKERS == 1)); then
        replication_factor=1
        min_insync_replicas=1
    else
        replication_factor=3
        min_insync_replicas=2
    fi
    for ((other = 1; other <= BROKERS; other++)); do
        voters+=("$other@127.0.0.1:$(controller_port "$other")")
    done

    local IFS=,
    cat >"$(node_dir "$node")/server.properties" <<EOF
# Written by kafka.sh start; changes are lost at the next start.
process.roles=broker,controller
node.id=$node
controller.quorum.voters=${voters[*]}
listeners=PLAINTEXT://127.0.0.1:$(client_port "$node"),CONTROLLER://127.0.0.1:$(controller_port "$node")
advertised.listeners=PLAINTEXT://127.0.0.1:$(client_port "$node")
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
log.dirs=$DATA_DIR/node-$node

# Topics are created explicitly, as in production.
auto.create.topics.enable=false
num.partitions=1
default.replication.factor=$replication_factor
min.insync.replicas=$min_insync_replicas
unclean.leader.election.enable=false

# Internal topics: replicated like data topics, and with fewer partitions than the default 50,
# so that the first consumer group or transactional producer starts quickly.
offsets.topic.replication.factor=$replication_factor
offsets.topic.num.partitions=5
transaction.state.log.replication.factor=$replication_factor
transaction.state.log.min.isr=$min_insync_replicas
transaction.state.log.num.partitions=5
share.coordinator.state.topic.replication.factor=$replication_factor
share.coordinator.state.topic.min.isr=$min_insync_replicas

# A consumer group's first rebalance starts at once instead of after 3 s.
group.initial.rebalance.delay.ms=0

# Fewer threads and a smaller compaction buffer than the defaults (8 I/O threads, 128 MiB),
# sized for a test machine with a few cores.
num.network.threads=2
num.io.threads=4
background.threads=4
log.cleaner.dedupe.buffer.size=16777216
EOF
}

format_node() {
    local node=$1 log_file
    log_file=$(node_dir "$node")/kafka.log
    if ! run_tool kafka.tools.StorageTool format --cluster-id "$CLUSTER_ID" \
        --config "$(node_dir "$node")/server.properties" >>"$log_file" 2>&1; then
        die "formatting the storage of node $node failed; see $log_file"
    fi
}

# Starts node N in its own session, so that a signal sent to the caller's process group (Ctrl-C,
# a test runner ending) leaves it running until 'stop' or 'stop-broker'.
launch_node() {
    local node=$1 dir
    dir=$(node_dir "$node")
    check_ports_free "$(client_port "$node")" "$(controller_port "$node")"

    echo "[$(date '+%F %T')] kafka.sh: starting node $node" >>"$dir/kafka.log"
    # setsid does not fork here, because a background job of a script is not a process group
    # leader, so $! is the pid of the java process itself. Descriptor 9 is closed because it
    # carries the run directory's lock, which the broker would otherwise keep until it exits.
    setsid "$JAVA" -Xms128m -Xmx"$BROKER_HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$SCRIPT_DIR/log4j2-broker.properties" \
        -cp "$LIB_DIR/*" kafka.Kafka "$dir/server.properties" \
        </dev/null >>"$dir/kafka.log" 2>&1 9>&- &
    echo $! >"$dir/kafka.pid"
    log "started node $node (pid $!) on 127.0.0.1:$(client_port "$node"); log: $dir/kafka.log"
}

# Sends SIGTERM to the given nodes, waits up to STOP_TIMEOUT seconds for all of them, then kills
# those still running.
#
# On SIGTERM a node first sends a controlled shutdown request to the active controller, which
# moves the node's partition leaders away. That needs a majority of the controller quorum. When the whole cluster
# stops, the nodes left after the majority has exited wait for an approval that cannot come,
# up to the broker's default shutdown timeout of 5 minutes. Once the quorum is gone, such nodes
# get 5 s more and are then killed. Kafka recovers their logs at the next start if the data is
# kept.
stop_nodes() {
    local node pid pids=() nodes=()
    for node in "$@"; do
        if pid=$(node_pid "$node"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            nodes+=("$node")
        else
            rm -f "$(node_dir "$node")/kafka.pid"
        fi
    done
    ((${#pids[@]} > 0)) || return 0

    local majority=$((BROKERS / 2 + 1)) deadline=$((SECONDS + STOP_TIMEOUT))
    local quorum_lost_at="" alive other
    while ((SECONDS < deadline)); do
        alive=0
        for pid in "${pids[@]}"; do
            if pid_alive "$pid"; then
                alive=$((alive + 1))
            fi
        done
        ((alive > 0)) || break

        # Nodes outside the given list count towards the quorum too.
        for ((other = 1; other <= BROKERS; other++)); do
            if [[ " ${nodes[*]} " != *" $other "* ]] && node_pid "$other" >/dev/null; then
                alive=$((alive + 1))
            fi
        done
        if ((alive < majority)); then
            quorum_lost_at=${quorum_lost_at:-$SECONDS}
            if ((SECONDS - quorum_lost_at >= 5)); then
                log "the controller quorum is gone, so the remaining nodes cannot finish a controlled shutdown"
                break
            fi
        fi
        sleep 0.2
    done

    local index waited
    for index in "${!pids[@]}"; do
        pid=${pids[$index]}
        node=${nodes[$index]}
        if pid_alive "$pid"; then
            log "node $node (pid $pid) is still running after SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            waited=0
            while pid_alive "$pid" && ((waited < 100)); do
                sleep 0.1
                waited=$((waited + 1))
            done
        fi
        rm -f "$(node_dir "$node")/kafka.pid"
        log "stopped node $node (pid $pid)"
    done
}

# ---------------------------------------------------------------------------------------------
# Commands

cmd_start() {
    local brokers=1 data_dir=""
    while (($# > 0)); do
        case $1 in
        --brokers)
            [[ $# -ge 2 ]] || die "--brokers needs a value: 1 or 3"
            brokers=$2
            shift 2
            ;;
        --dir)
            [[ $# -ge 2 && -n $2 ]] || die "--dir needs a folder"
            data_dir=$2
            shift 2
            ;;
        *) die "unknown option for start: $1 (see kafka.sh help)" ;;
        esac
    done
    [[ $brokers == 1 || $brokers == 3 ]] || die "invalid --brokers value '$brokers'; use 1 or 3"

    local node base_port=${CHARTLOG_KAFKA_PORT:-$DEFAULT_PORT}
    if ! [[ $base_port =~ ^[0-9]+$ ]] || ((base_port < 1024 || base_port + 2 * brokers - 1 > 65535)); then
        die "invalid CHARTLOG_KAFKA_PORT '$base_port'; use a port from 1024 to $((65536 - 2 * brokers))"
    fi

    lock_run_dir
    if [[ -f $STATE_FILE ]]; then
        load_state
        for ((node = 1; node <= BROKERS; node++)); do
            if node_pid "$node" >/dev/null; then
                die "a cluster from $RUN_DIR is still running (node $node); run kafka.sh stop first"
            fi
        done
        # A cluster that was never stopped, for example because the machine restarted.
        log "removing the state of an earlier cluster that was not stopped"
        if [[ $DATA_DIR_IS_TEMPORARY == 1 ]]; then
            rm -rf "$DATA_DIR"
        fi
        rm -f "$STATE_FILE"
    fi

    fetch
    check_java

    BROKERS=$brokers
    BASE_PORT=$base_port
    for ((node = 1; node <= BROKERS; node++)); do
        check_ports_free "$(client_port "$node")" "$(controller_port "$node")"
    done

    if [[ -n $data_dir ]]; then
        mkdir -p "$data_dir"
        DATA_DIR=$(cd "$data_dir" && pwd)
        DATA_DIR_IS_TEMPORARY=0
    else
        DATA_DIR=$(mktemp -d "$RUN_DIR/data.XXXXXX")
        DATA_DIR_IS_TEMPORARY=1
    fi

    # Data kept by 'stop --keep-data' is reused as it is. Otherwise every node is formatted with
    # a new random cluster id: 16 random bytes in URL-safe base64, the form Kafka uses.
    local formatted=0
    for ((node = 1; node <= BROKERS; node++)); do
        if [[ -f $DATA_DIR/node-$node/meta.properties ]]; then
            formatted=$((formatted + 1))
        fi
    done
    local format_needed
    if ((formatted == BROKERS)); then
        format_needed=0
        CLUSTER_ID=$(sed -n 's/^cluster\.id=//p' "$DATA_DIR/node-1/meta.properties")
        log "reusing the data of cluster $CLUSTER_ID in $DATA_DIR"
    elif ((formatted == 0)); then
        format_needed=1
        CLUSTER_ID=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
    else
        die "$DATA_DIR contains data for $formatted of $BROKERS nodes; use an empty folder or one kept from a cluster of $BROKERS"
    fi

    write_state
    rm -rf "$RUN_DIR"/node-*
    for ((node = 1; node <= BROKERS; node++)); do
        mkdir -p "$(node_dir "$node")"
        write_server_properties "$node"
        if ((format_needed)); then
            format_node "$node"
        fi
    done
    for ((node = 1; node <= BROKERS; node++)); do
        launch_node "$node"
    done
    log "bootstrap servers: $(bootstrap_servers); run kafka.sh wait before connecting"
}

cmd_wait() {
    local timeout=90
    while (($# > 0)); do
        case $1 in
        --timeout)
            [[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || die "--timeout needs a number of seconds"
            timeout=$2
            shift 2
            ;;
        *) die "unknown option for wait: $1 (see kafka.sh help)" ;;
        esac
    done
    load_state
    require_jars

    # The nodes to wait for are those with a pid file: 'stop-broker' removes it, while a node that
    # crashed leaves it behind and is reported below.
    local node nodes=() servers=()
    for ((node = 1; node <= BROKERS; node++)); do
        if [[ -f $(node_dir "$node")/kafka.pid ]]; then
            nodes+=("$node")
            servers+=("127.0.0.1:$(client_port "$node")")
        fi
    done
    ((${#nodes[@]} > 0)) || die "no node of the cluster in $RUN_DIR is running; run kafka.sh start"

    local deadline=$((SECONDS + timeout)) pending output remaining
    local bootstrap
    bootstrap=$(
        IFS=,
        echo "${servers[*]}"
    )
    while true; do
        pending=""
        for node in "${nodes[@]}"; do
            if ! node_pid "$node" >/dev/null; then
                die "node $node is not running (it exited or was killed); see $(node_dir "$node")/kafka.log"
            fi
            if [[ -z $pending ]] && ! port_in_use "$(client_port "$node")"; then
                pending=$node
            fi
        done

        # Every client port is open, so request the API versions of each node. A node is ready
        # when it appears in the cluster metadata, which lists only registered, unfenced brokers,
        # and responds to the request itself.
        if [[ -z $pending ]]; then
            remaining=$((deadline - SECONDS))
            ((remaining > 1)) || remaining=1
            output=$(timeout "$((remaining < 30 ? remaining : 30))" \
                "${TOOL_JAVA[@]}" org.apache.kafka.tools.BrokerApiVersionsCommand \
                --bootstrap-server "$bootstrap" 2>/dev/null) || true
            for node in "${nodes[@]}"; do
                if ! grep -qE "^127\.0\.0\.1:$(client_port "$node") \(id: $node .*-> \($" <<<"$output"; then
                    pending=$node
                    break
                fi
            done
            if [[ -z $pending ]]; then
                log "ready: node(s) ${nodes[*]}; bootstrap servers: $bootstrap"
                return 0
            fi
        fi

        if ((SECONDS >= deadline)); then
            die "timed out after $timeout s waiting for node $pending on 127.0.0.1:$(client_port "$pending"); see $(node_dir "$pending")/kafka.log"
        fi
        sleep 1
    done
}

cmd_stop() {
    local keep_data=0
    while (($# > 0)); do
        case $1 in
        --keep-data)
            keep_data=1
            shift
            ;;
        *) die "unknown option for stop: $1 (see kafka.sh help)" ;;
        esac
    done
    lock_run_dir
    if [[ ! -f $STATE_FILE ]]; then
        log "no cluster is running from $RUN_DIR"
        return 0
    fi
    load_state

    local node nodes=()
    for ((node = 1; node <= BROKERS; node++)); do
        nodes+=("$node")
    done
    stop_nodes "${nodes[@]}"

    if ((keep_data)) || [[ $DATA_DIR_IS_TEMPORARY != 1 ]]; then
        log "kept the data in $DATA_DIR; resume with: kafka.sh start --brokers $BROKERS --dir $DATA_DIR"
    else
        rm -rf "$DATA_DIR"
        log "deleted the data in $DATA_DIR"
    fi
    rm -f "$STATE_FILE"
}

cmd_stop_broker() {
    [[ $# -eq 1 ]] || die "usage: kafka.sh stop-broker N"
    lock_run_dir
    load_state
    validate_node "$1"
    if ! node_pid "$1" >/dev/null; then
        log "node $1 is not running"
        return 0
    fi
    stop_nodes "$1"
}

cmd_start_broker() {
    [[ $# -eq 1 ]] || die "usage: kafka.sh start-broker N"
    lock_run_dir
    load_state
    validate_node "$1"
    require_jars
    local pid
    if pid=$(node_pid "$1"); then
        log "node $1 is already running (pid $pid)"
        return 0
    fi
    launch_node "$1"
}

cmd_status() {
    load_state
    local node pid
    echo "cluster $CLUSTER_ID, $BROKERS node(s), data in $DATA_DIR"
    for ((node = 1; node <= BROKERS; node++)); do
        if pid=$(node_pid "$node"); then
            echo "node $node: running, pid $pid, 127.0.0.1:$(client_port "$node"), log $(node_dir "$node")/kafka.log"
        else
            echo "node $node: stopped, 127.0.0.1:$(client_port "$node"), log $(node_dir "$node")/kafka.log"
        fi
    done
}

main() {
    [[ -n $KAFKA_VERSION ]] || die "no <kafka.version> found in $POM"
    [[ $STOP_TIMEOUT =~ ^[0-9]+$ ]] ||
        die "invalid CHARTLOG_KAFKA_STOP_TIMEOUT '$STOP_TIMEOUT'; use a number of seconds"
    [[ $BROKER_HEAP =~ ^[0-9]+[kKmMgG]?$ ]] ||
        die "invalid CHARTLOG_KAFKA_HEAP '$BROKER_HEAP'; use a Java heap size such as 512m"
    local command=${1:-help}
    shift || true
    case $command in
    fetch) fetch "$@" ;;
    start) cmd_start "$@" ;;
    wait) cmd_wait "$@" ;;
    bootstrap)
        load_state
        bootstrap_servers
        ;;
    status) cmd_status ;;
    stop) cmd_stop "$@" ;;
    stop-broker) cmd_stop_broker "$@" ;;
    start-broker) cmd_start_broker "$@" ;;
    run-class)
        [[ $# -ge 1 ]] || die "usage: kafka.sh run-class CLASS [ARGS...]"
        require_jars
        run_tool "$@"
        ;;
    help | -h | --help) usage ;;
    *) die "unknown command '$command' (see kafka.sh help)" ;;
    esac
}

main "$@"
