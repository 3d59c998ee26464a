#!/usr/bin/env bash
# One-shot `kafka-security` service: SCRAM credentials and ACLs of the compose deployment's users,
# run on every `docker compose up` (each step is idempotent, so a changed password in .env is
# applied by the next `up`). The same grants as beamstream/operations/local_security.py gives the local broker:
#
#   beamstream (BEAMSTREAM_SASL_USERNAME)  every Beamstream service: everything under the topic prefix
#                                          (topics, consumer groups, transactional ids), idempotent writes
#   $REGISTRY_USER                         Apicurio's kafkasql storage: its journal topics and groups only
#   $UI_USER                               Kafka UI (read-only): read and describe under the prefix
#
# The broker's super user `admin` is created when the data volume is formatted (docker/kafka/start.sh).
# Passwords are read from compose secret files and handed to kafka-configs.sh in a 0600 file that is
# deleted afterwards: never on a command line, never in the log.
set -euo pipefail

# The image's Kafka tools and the compose secrets; overridable so that tests/test_compose.py can run
# this script against stand-ins.
bin="${IMAGE_KAFKA_HOME:-/opt/kafka}/bin"
secrets="${SECRETS_DIR:-/run/secrets}"
bootstrap="${BEAMSTREAM_BOOTSTRAP_SERVERS:?}"
admin_config="${ADMIN_CLIENT_CONFIG:?}"
prefix="${BEAMSTREAM_TOPIC_PREFIX:?}"
service_user="${BEAMSTREAM_SASL_USERNAME:?}"
registry_user="${REGISTRY_USER:?}"
ui_user="${UI_USER:?}"

work="$(mktemp -d)"
chmod 700 "$work"
trap 'rm -rf "$work"' EXIT

read_password() {  # read_password FILE: the file's exact content, checked like start.sh checks admin's
    local value
    value="$(cat "$1"; printf x)"
    value="${value%x}"
    if ! [[ "$value" =~ ^[A-Za-z0-9._~-]{16,}$ ]]; then
        echo "kafka-security: $1 must hold at least 16 characters of A-Z a-z 0-9 . _ ~ - and no newline" >&2
        return 1
    fi
    printf '%s' "$value"
}

scram_user() {  # scram_user NAME SECRET_FILE: create or update NAME's SCRAM-SHA-512 credential
    local password
    password="$(read_password "$2")"
    (umask 077; printf 'SCRAM-SHA-512=password=%s\n' "$password" >"$work/scram.properties")
    "$bin/kafka-configs.sh" --bootstrap-server "$bootstrap" --command-config "$admin_config" \
        --alter --entity-type users --entity-name "$1" --add-config-file "$work/scram.properties" >/dev/null
    rm -f "$work/scram.properties"
    echo "kafka-security: SCRAM-SHA-512 credential of $1 set"
}

allow() {  # allow PRINCIPAL ARGS...: add ACLs (adding an existing ACL changes nothing)
    local principal="$1"
    shift
    "$bin/kafka-acls.sh" --bootstrap-server "$bootstrap" --command-config "$admin_config" \
        --add --allow-principal "User:$principal" "$@" >/dev/null
}

scram_user "$service_user" "$secrets/kafka_beamstream_password"
scram_user "$registry_user" "$secrets/kafka_registry_password"
scram_user "$ui_user" "$secrets/kafka_ui_password"

allow "$service_user" --operation All --resource-pattern-type prefixed \
    --topic "$prefix" --group "$prefix" --transactional-id "$prefix"
allow "$service_user" --operation IdempotentWrite --cluster

# Apicurio's journal topics are named ${prefix}registry-*, and so are its consumer groups
# (APICURIO_KAFKASQL_CONSUMER_GROUP_PREFIX in compose.yaml).
allow "$registry_user" --operation All --resource-pattern-type prefixed \
    --topic "${prefix}registry-" --group "${prefix}registry-"
allow "$registry_user" --operation IdempotentWrite --cluster

allow "$ui_user" --operation Read --operation Describe --operation DescribeConfigs \
    --resource-pattern-type prefixed --topic "$prefix"
allow "$ui_user" --operation Describe --resource-pattern-type prefixed --group "$prefix"
allow "$ui_user" --operation Describe --operation DescribeConfigs --cluster

echo "kafka-security: ACLs of $service_user, $registry_user and $ui_user under prefix '$prefix' in place"
