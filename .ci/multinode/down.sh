#!/usr/bin/env bash
# Tear down the two-host cluster of up.sh: cancel its jobs, stop its daemons, end every
# process still running on a host (a host's processes are those in its network namespace,
# all started by this cluster), delete the namespaces, the bridge and the files. Idempotent.
set -uo pipefail
BASE=${MULTINODE_BASE:-/tmp/moemesh-multinode}
PREFIX=mmn
export SLURM_CONF=$BASE/etc/slurm.conf
if [ -f "$SLURM_CONF" ] && timeout 10 scontrol ping > /dev/null 2>&1; then
  timeout 10 scancel --user=root > /dev/null 2>&1 || true
fi
pids=""
for f in "$BASE"/run/*.pid "$BASE"/munge/munged.pid; do
  [ -s "$f" ] && pid=$(cat "$f") && kill -0 "$pid" 2> /dev/null && kill "$pid" && pids="$pids $pid"
done
for ns in "$PREFIX-n1" "$PREFIX-n2"; do
  [ -e "/run/netns/$ns" ] || continue
  for pid in $(ip netns pids "$ns" 2> /dev/null); do kill "$pid" 2> /dev/null && pids="$pids $pid"; done
done
for _ in $(seq 40); do
  alive=""; for p in $pids; do kill -0 "$p" 2> /dev/null && alive="$alive $p"; done
  [ -z "$alive" ] && break; sleep 0.25
done
for p in $alive; do kill -9 "$p" 2> /dev/null; done
for ns in "$PREFIX-n1" "$PREFIX-n2"; do
  if [ -e "/run/netns/$ns" ]; then
    for pid in $(ip netns pids "$ns" 2> /dev/null); do kill -9 "$pid" 2> /dev/null; done
    ip netns del "$ns" 2> /dev/null
  fi
  ip link del "$PREFIX-${ns#"$PREFIX"-}" 2> /dev/null
  rm -rf "/etc/netns/$ns"
done
ip link del "$PREFIX-br" 2> /dev/null
rm -rf "$BASE"
echo "multinode down"
