#!/usr/bin/env bash
# Start-up of the compose `kafka` service: the apache/kafka image's own (/etc/kafka/docker/run:
# KAFKA_* variables -> server.properties, format the storage if new, start the broker), preceded
# by the one step that image cannot do: formatting a new data volume WITH the broker's own SCRAM
# credential. The broker logs in to itself over SCRAM (transaction markers go over the INTERNAL
# listener), and with SASL on every listener that credential can only be bootstrapped at format
# time. beamstream/operations/cluster.py does the same for the local broker.
#
# The admin password is read from the file ADMIN_PASSWORD_FILE names (a compose secret) and
# reaches the storage tool through a java @argument file, never a command line that `ps` on the
# Docker host would show to every user.
set -euo pipefail

# Where the image keeps Kafka and its own start-up; overridable so that tests/test_compose.py can run
# this script against stand-ins.
kafka_home="${IMAGE_KAFKA_HOME:-/opt/kafka}"
image_run="${IMAGE_RUN:-/etc/kafka/docker/run}"
data="${KAFKA_LOG_DIRS:?KAFKA_LOG_DIRS is not set}"
password_file="${ADMIN_PASSWORD_FILE:?ADMIN_PASSWORD_FILE is not set}"
# Written after our own format: a volume without it was formatted without SCRAM credentials.
marker="$data/.beamstream-scram-formatted"

if [ ! -f "$data/meta.properties" ]; then
    # The exact file content: the broker reads the same file through Kafka's DirectoryConfigProvider,
    # which does not trim, so a stray newline would make the two passwords differ.
    password="$(cat "$password_file"; printf x)"
    password="${password%x}"
    if ! [[ "$password" =~ ^[A-Za-z0-9._~-]{16,}$ ]]; then
        echo "kafka: $password_file must hold at least 16 characters of A-Z a-z 0-9 . _ ~ - and no newline" \
             "(e.g. openssl rand -hex 24); they go unquoted into the SCRAM and JAAS configuration" >&2
        exit 1
    fi
    work="$(mktemp -d)"
    chmod 700 "$work"
    # What formatting needs: the node's identity, its quorum and where the metadata log lives.
    # The listeners here only satisfy the config check; the broker runs with the full configuration.
    cat >"$work/format.properties" <<EOF
process.roles=${KAFKA_PROCESS_ROLES:?}
node.id=${KAFKA_NODE_ID:?}
controller.quorum.voters=${KAFKA_CONTROLLER_QUORUM_VOTERS:?}
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://:19092,CONTROLLER://:9093
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$data
EOF
    (
        umask 077
        printf '%s\n' kafka.tools.StorageTool format "--cluster-id=${CLUSTER_ID:?}" \
            --config "$work/format.properties" \
            --add-scram "SCRAM-SHA-512=[name=admin,password=$password]" >"$work/format.args"
    )
    unset password
    echo "===> Formatting $data with the admin SCRAM credential ..."
    status=0
    "$kafka_home/bin/kafka-run-class.sh" "@$work/format.args" || status=$?
    rm -rf "$work"
    [ "$status" -eq 0 ] || exit "$status"
    touch "$marker"
elif [ ! -f "$marker" ]; then
    echo "kafka: $data was formatted without SCRAM credentials (a volume from before SASL was enabled)." \
         "Remove it to start afresh, which deletes every topic: docker compose down && docker volume rm" \
         "beamstream_kafka-data" >&2
    exit 1
fi

exec "$image_run"
