#!/usr/bin/env bash
# The project's copy of shared/tools/slurm-local/up.sh (CI runs it from a fresh clone, where
# shared/ may not exist). .ci/run starts it for tests/test_slurm_cluster.py and stops it after.
# Bring up a real single-node SLURM 22.05 cluster (Debian 12, root, no systemd).
# Usage:  bash up.sh            # with accounting (slurmdbd + MariaDB) so `sacct` works
#         ACCOUNTING=0 bash up.sh   # without (sacct fails; submitit still works via result files)
# Afterwards:  export SLURM_CONF=$BASE/etc/slurm.conf   (clients: sinfo/srun/sbatch/sacct/submitit)
set -euo pipefail
# Daemons that drop to their own users (munge, mysql) must read what this script creates,
# whatever umask the caller has (a pytest process that ran train.py in-process has 077).
umask 022
BASE=${SLURM_BASE:-/tmp/moemesh-slurm}
CPUS=${SLURM_CPUS:-8}            # advertised CPUs (> real cores => oversubscription for 4/8 tasks)
ACCOUNTING=${ACCOUNTING:-1}
DB_PORT=${SLURM_DB_PORT:-3307}   # private MariaDB for slurmdbd, loopback only
HOST=$(hostname -s)
MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 * 3 / 4 ))
export SLURM_CONF=$BASE/etc/slurm.conf
t0=$(date +%s)
# idempotent: stop a cluster left by an earlier run (down.sh only kills pids from its pid files)
[ -f "$(dirname "$0")/down.sh" ] && SLURM_BASE=$BASE bash "$(dirname "$0")/down.sh" >/dev/null 2>&1 || true

# 1. packages (no-op when present; ~13 s, + ~17 s for accounting)
pkgs="slurmctld slurmd slurm-client munge"
[ "$ACCOUNTING" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
missing=""; for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

mkdir -p "$BASE"/{etc,state,spool,log,run}
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >> /etc/hosts   # MASTER_ADDR=$HOST must resolve

# 2. munge (Debian's postinst normally creates /etc/munge/munge.key)
[ -s /etc/munge/munge.key ] || { mungekey -c -f -k /etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
if ! munge -n >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for i in $(seq 40); do munge -n >/dev/null 2>&1 && break; sleep 0.25; done
fi

# 3. config
cat > "$SLURM_CONF" <<EOF
ClusterName=ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MailProg=/bin/true
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MinJobAge=300
KillWait=5
SlurmdParameters=config_overrides
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

if [ "$ACCOUNTING" = 1 ]; then
  cat >> "$SLURM_CONF" <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
EOF
  cat > "$BASE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$BASE/run/slurmdbd.pid
LogFile=$BASE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$BASE/etc/slurmdbd.conf"   # slurmdbd refuses a world-readable file
  # MariaDB: private datadir, loopback only
  if [ ! -d "$BASE/db/data/mysql" ]; then
    mkdir -p "$BASE/db"
    mariadb-install-db --user=root --datadir="$BASE/db/data" --auth-root-authentication-method=socket > "$BASE/log/mariadb-install.log" 2>&1
  fi
  mariadbd --no-defaults --user=root --datadir="$BASE/db/data" --socket="$BASE/run/mysql.sock" \
    --bind-address=127.0.0.1 --port=$DB_PORT --pid-file="$BASE/run/mysqld.pid" \
    --log-error="$BASE/log/mysqld.err" --innodb-buffer-pool-size=64M > /dev/null 2>&1 &
  for i in $(seq 120); do mariadb -S "$BASE/run/mysql.sock" -e 'select 1' >/dev/null 2>&1 && break; sleep 0.25; done
  mariadb -S "$BASE/run/mysql.sock" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  slurmdbd            # daemonizes; finds slurmdbd.conf next to \$SLURM_CONF
  for i in $(seq 120); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.25; done
fi

# 4. controller + node daemon (both daemonize, write pid files under $BASE/run)
slurmctld
slurmd
for i in $(seq 120); do sinfo -h -o '%t' 2>/dev/null | grep -qx idle && break; sleep 0.25; done
sinfo -h -o '%t' | grep -qx idle || { echo "node not idle"; sinfo; tail -20 "$BASE"/log/*.log; exit 1; }
if [ "$ACCOUNTING" = 1 ]; then   # slurmctld registers cluster "ci" itself; wait for it
  for i in $(seq 120); do sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx ci && break; sleep 0.25; done
fi
echo "slurm up in $(( $(date +%s) - t0 )) s; export SLURM_CONF=$SLURM_CONF"
sinfo
