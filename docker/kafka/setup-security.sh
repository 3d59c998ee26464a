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
# deleted afterwards: never on a command line, never in the log (scram-users.sh).
set -euo pipefail

me=kafka-security
prefix="${BEAMSTREAM_TOPIC_PREFIX:?}"
service_user="${BEAMSTREAM_SASL_USERNAME:?}"
registry_user="${REGISTRY_USER:?}"
ui_user="${UI_USER:?}"
# bin, secrets and the scram_user and allow steps, shared with setup-bluesky.sh.
source "$(dirname "${BASH_SOURCE[0]}")/scram-users.sh"

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
