#!/usr/bin/env bash
# Start the local Redis and PostgreSQL the tests talk to, if they are not already up.
# (The commands are this machine's own; see the machine notes: Debian packages, trust auth.)
set -uo pipefail
up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if ! up 6379; then
  echo "starting redis-server on 127.0.0.1:6379"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
if ! up 5432; then
  echo "starting PostgreSQL on 127.0.0.1:5432"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
fi
for i in $(seq 1 30); do
  if up 6379 && up 5432; then exit 0; fi
  sleep 1
done
echo "Redis or PostgreSQL did not come up (ports 6379, 5432)" >&2
exit 1
