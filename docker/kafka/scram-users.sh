# Sourced (not run) by the one-shot setup services, setup-security.sh and setup-bluesky.sh: how they set a
# Kafka user's SCRAM credential from a compose secret file and grant it ACLs, as the broker's super user.
# The caller sets `me` (its service's name, for messages) and BEAMSTREAM_BOOTSTRAP_SERVERS and
# ADMIN_CLIENT_CONFIG (compose.yaml) before sourcing.
#
# A password is read from its secret file and handed to kafka-configs.sh in a 0600 file in a 0700 directory
# that is deleted afterwards: never on a command line (which `ps` shows every user), never in the log.

# The image's Kafka tools and the compose secrets; overridable so that tests/unit/test_compose.py can run the
# scripts against stand-ins.
bin="${IMAGE_KAFKA_HOME:-/opt/kafka}/bin"
secrets="${SECRETS_DIR:-/run/secrets}"
bootstrap="${BEAMSTREAM_BOOTSTRAP_SERVERS:?}"
admin_config="${ADMIN_CLIENT_CONFIG:?}"

work="$(mktemp -d)"
chmod 700 "$work"
trap 'rm -rf "$work"' EXIT

read_password() {  # read_password FILE: the file's exact content, checked like start.sh checks admin's
    local value
    value="$(cat "$1"; printf x)"
    value="${value%x}"
    if ! [[ "$value" =~ ^[A-Za-z0-9._~-]{16,}$ ]]; then
        echo "$me: $1 must hold at least 16 characters of A-Z a-z 0-9 . _ ~ - and no newline" \
             "(docker/new-env generates every password docker/.env needs)" >&2
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
    echo "$me: SCRAM-SHA-512 credential of $1 set"
}

allow() {  # allow PRINCIPAL ARGS...: add ACLs (adding an existing ACL changes nothing)
    local principal="$1"
    shift
    "$bin/kafka-acls.sh" --bootstrap-server "$bootstrap" --command-config "$admin_config" \
        --add --allow-principal "User:$principal" "$@" >/dev/null
}
