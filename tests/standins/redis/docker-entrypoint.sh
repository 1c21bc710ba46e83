#!/bin/sh
# As the official image: `redis-server ...` runs with protected mode off (Debian's default is on).
set -e
if [ "$1" = "redis-server" ]; then
    shift
    exec redis-server --protected-mode no "$@"
fi
exec "$@"
