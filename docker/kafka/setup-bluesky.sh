#!/usr/bin/env bash
# One-shot `bluesky-setup` service (compose profile `bluesky`): the beamline's Bluesky document topic, which
# its RunEngine's bluesky-kafka Publisher writes and `beamstream bluesky-bridge` reads, the bridge's right to
# read it, and the Publisher's Kafka user with its right to write it. Run on every `up` of the profile (so a
# changed password in .env is applied by the next `up`); each step is idempotent.
#
#   - Creates BLUESKY_DOCUMENT_TOPIC if it is missing (the bridge refuses to start without it, and this
#     broker creates no topic on first write), with one partition: a Publisher keys every document with its
#     one key, so a run's documents share a partition whatever the count. A topic that exists is left as the
#     beamline made it (its partitions, its retention).
#   - Lets the service user (BEAMSTREAM_SASL_USERNAME: every Beamstream service, the bridge included) Read and
#     Describe it, by its literal name: beamstream/operations/local_security.read_topic_acls. All else the
#     bridge touches is under the topic prefix, which setup-security.sh grants: group <prefix>bluesky-bridge,
#     transactional ids <prefix>bluesky-bridge-*, <prefix>bluesky-bridge-changelog, and writes to images,
#     collections and deadletter.
#   - Sets the SCRAM-SHA-512 credential of the beamline's Publisher (BLUESKY_PUBLISHER_USER, password from the
#     compose secret kafka_bluesky_publisher_password, KAFKA_BLUESKY_PUBLISHER_PASSWORD in .env) and lets it
#     Write and Describe the topic, by its literal name: beamstream/operations/local_security.publish_topic_acls.
#     Nothing else: it may not read the topic, write any other, or use a group or a transactional id. An
#     idempotent Publisher (enable.idempotence, bluesky-kafka's recommended producer_config) needs no
#     IdempotentWrite on the cluster: since Kafka 2.8 (KIP-679) Write on a topic is enough.
set -euo pipefail

me=bluesky-setup
service_user="${BEAMSTREAM_SASL_USERNAME:?}"
publisher_user="${BLUESKY_PUBLISHER_USER:?}"
replicas="${BEAMSTREAM_REPLICATION_FACTOR:-1}"
topic="${BLUESKY_DOCUMENT_TOPIC:?}"

# Kafka's own rule for a topic name, checked here so that a typo in .env is one line, not a Java stack trace.
if ! [[ "$topic" =~ ^[A-Za-z0-9._-]{1,249}$ ]] || [ "$topic" = . ] || [ "$topic" = .. ]; then
    echo "bluesky-setup: BLUESKY_DOCUMENT_TOPIC='$topic' is not a Kafka topic name" \
         "(1 to 249 of A-Z a-z 0-9 . _ -)" >&2
    exit 1
fi

# bin, secrets and the scram_user and allow steps, shared with setup-security.sh.
source "$(dirname "${BASH_SOURCE[0]}")/scram-users.sh"

# First: a .env from before this user (no KAFKA_BLUESKY_PUBLISHER_PASSWORD) stops here, before any change.
scram_user "$publisher_user" "$secrets/kafka_bluesky_publisher_password"
"$bin/kafka-topics.sh" --bootstrap-server "$bootstrap" --command-config "$admin_config" \
    --create --if-not-exists --topic "$topic" --partitions 1 --replication-factor "$replicas" >/dev/null
allow "$service_user" --operation Read --operation Describe --topic "$topic"
allow "$publisher_user" --operation Write --operation Describe --topic "$topic"

echo "$me: document topic $topic in place; $service_user may read and describe it, $publisher_user" \
     "may write and describe it"
