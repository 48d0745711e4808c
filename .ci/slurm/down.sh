#!/usr/bin/env bash
# The project's copy of shared/tools/slurm-local/down.sh; .ci/run calls it on exit.
# Tear down the cluster started by up.sh: cancel jobs, stop daemons by their pid files, wipe state.
# KEEP_STATE=1 keeps state/db dirs (next up.sh then recovers old jobs/accounting).
set -uo pipefail
BASE=${SLURM_BASE:-/tmp/moemesh-slurm}
export SLURM_CONF=$BASE/etc/slurm.conf
if [ -f "$SLURM_CONF" ] && scontrol ping >/dev/null 2>&1; then
  scancel --user=root >/dev/null 2>&1 || true
  # submitit ignores SIGTERM, so cancelled steps live until KillWait (5 s) -> SIGKILL.
  # Wait for them while slurmd is still alive, otherwise their slurmstepd is orphaned.
  for i in $(seq 60); do
    [ -z "$(squeue -h 2>/dev/null)" ] && [ -z "$(scontrol listpids 2>/dev/null | tail -n +2)" ] && break
    sleep 0.5
  done
  for pid in $(scontrol listpids 2>/dev/null | awk 'NR>1{print $1}'); do kill -9 "$pid" 2>/dev/null; done
fi

# SIGTERM every daemon (pid files only), wait up to 15 s, then SIGKILL those pids that remain
pids=""
for f in "$BASE"/run/slurmd.pid "$BASE"/run/slurmctld.pid "$BASE"/run/slurmdbd.pid "$BASE"/run/mysqld.pid /run/munge/munged.pid; do
  [ -s "$f" ] && pid=$(cat "$f") && kill -0 "$pid" 2>/dev/null && kill "$pid" && pids="$pids $pid"
  rm -f "$f"
done
for i in $(seq 60); do
  alive=""; for p in $pids; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
  [ -z "$alive" ] && break; sleep 0.25
done
for p in $alive; do kill -9 "$p" 2>/dev/null; done
if [ "${KEEP_STATE:-0}" != 1 ]; then
  rm -rf "$BASE/state" "$BASE/spool" "$BASE/db" "$BASE/run"
fi
echo "slurm down"
