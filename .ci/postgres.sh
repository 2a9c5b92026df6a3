#!/usr/bin/env bash
# Runs a command with a throwaway PostgreSQL server (the search tests' RDB storage):
#   .ci/postgres.sh make test-e2e
# installs Debian's postgresql when absent (apt-get; needs root), creates a cluster in a
# temporary directory owned by the postgres user (initdb refuses root), starts it on 127.0.0.1
# at a free port (its unix socket in that directory), creates the database jaxmu_test, exports
#   JAXMU_TEST_POSTGRES_URL=postgresql+psycopg2://postgres@127.0.0.1:PORT/jaxmu_test
# (SQLAlchemy URL with the psycopg2 driver of the `search` extra; psql takes the URL without
# "+psycopg2"),
# runs the command, and stops the server and deletes the directory at exit, whatever happens.
set -euo pipefail
if [ $# -eq 0 ]; then
  echo "usage: $0 COMMAND [ARGS...]" >&2
  exit 2
fi

bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
if [ -z "$(bindir)" ] || [ ! -x "$(bindir)/initdb" ]; then
  echo "postgres.sh: installing PostgreSQL (apt-get)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
fi
BIN="$(bindir)"
# runuser as root; as the postgres user (or any non-root owner of the cluster) run directly.
if [ "$(id -u)" = 0 ]; then AS=(runuser -u postgres --); OWNER=postgres; else AS=(); OWNER="$(id -un)"; fi

DIR="$(mktemp -d "${TMPDIR:-/tmp}/jaxmu-pg.XXXXXX")"
chmod 755 "$DIR"
chown "$OWNER" "$DIR"
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

stop() {
  "${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
trap stop EXIT
trap 'exit 130' INT TERM

"${AS[@]}" "$BIN/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
    >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log" >&2; exit 1; }
# fsync off and a small footprint: a throwaway test server
"${AS[@]}" "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
    -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
-c full_page_writes=off -c max_connections=200 -c shared_buffers=32MB" start >/dev/null \
  || { cat "$DIR/server.log" >&2; exit 1; }
"${AS[@]}" "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres jaxmu_test
export JAXMU_TEST_POSTGRES_URL="postgresql+psycopg2://postgres@127.0.0.1:$PORT/jaxmu_test"
echo "postgres.sh: PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') at $JAXMU_TEST_POSTGRES_URL" >&2
status=0
"$@" || status=$?
exit "$status"
