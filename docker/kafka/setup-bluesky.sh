#!/usr/bin/env bash
# One-shot `bluesky-setup` service (compose profile `bluesky`): the beamline's Bluesky document topic, which
# its RunEngine's bluesky-kafka Publisher writes and `beamstream bluesky-bridge` reads, and the bridge's right
# to read it. Run on every `up` of the profile; each step is idempotent.
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
#
# The beamline's Publisher logs in as a Kafka user of its own, which needs Write and Describe on the topic;
# that user is not created here.
set -euo pipefail

# The image's Kafka tools; overridable so that tests/unit/test_compose.py can run this against stand-ins.
bin="${IMAGE_KAFKA_HOME:-/opt/kafka}/bin"
bootstrap="${BEAMSTREAM_BOOTSTRAP_SERVERS:?}"
admin_config="${ADMIN_CLIENT_CONFIG:?}"
service_user="${BEAMSTREAM_SASL_USERNAME:?}"
replicas="${BEAMSTREAM_REPLICATION_FACTOR:-1}"
topic="${BLUESKY_DOCUMENT_TOPIC:?}"

# Kafka's own rule for a topic name, checked here so that a typo in .env is one line, not a Java stack trace.
if ! [[ "$topic" =~ ^[A-Za-z0-9._-]{1,249}$ ]] || [ "$topic" = . ] || [ "$topic" = .. ]; then
    echo "bluesky-setup: BLUESKY_DOCUMENT_TOPIC='$topic' is not a Kafka topic name" \
         "(1 to 249 of A-Z a-z 0-9 . _ -)" >&2
    exit 1
fi

"$bin/kafka-topics.sh" --bootstrap-server "$bootstrap" --command-config "$admin_config" \
    --create --if-not-exists --topic "$topic" --partitions 1 --replication-factor "$replicas" >/dev/null
"$bin/kafka-acls.sh" --bootstrap-server "$bootstrap" --command-config "$admin_config" \
    --add --allow-principal "User:$service_user" --operation Read --operation Describe --topic "$topic" >/dev/null

echo "bluesky-setup: document topic $topic in place; $service_user may read and describe it"
