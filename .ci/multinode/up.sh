#!/usr/bin/env bash
# Two hosts on this machine for tests/test_multinode.py: n1 and n2, each its own network
# namespace (address, /etc/hosts) and, for every process started on it, its own hostname.
# A bridge joins them (the inter-host link; MULTINODE_RATE shapes it with tc tbf), and a
# SLURM cluster runs on them: slurmctld (and, with ACCOUNTING=1, slurmdbd + a private
# MariaDB) on n1, the head node, one slurmd per host, one munged shared by both.
#
#   bash .ci/multinode/up.sh                     # ~15 s once the packages are installed
#   export SLURM_CONF=/tmp/moemesh-multinode/etc/slurm.conf
#   bash .ci/multinode/on.sh n2 hostname         # run a command on a host: prints n2
#   bash .ci/multinode/shape.sh 200mbit          # shape the link between the hosts (tc tbf); off: unshaped
#   bash .ci/multinode/down.sh                   # everything gone: daemons, namespaces, files
#
# Nothing collides with .ci/slurm/up.sh's single-node cluster (/tmp/moemesh-slurm, ports
# 6817-6819 and MariaDB 3307 in this machine's namespace): the daemons here listen inside the
# hosts' namespaces, on the hosts' addresses only (CommunicationParameters=NoInAddrAny), and
# use their own munged socket, key, state and logs under $BASE. Both can run at once.
# Idempotent: it calls down.sh first. Writes $BASE/env (shell syntax) describing the cluster.
set -euo pipefail
# Daemons that drop to their own users (munge, mysql) must read what this script creates,
# whatever umask the caller has (a pytest process that ran train.py in-process has 077).
umask 022
HERE=$(cd "$(dirname "$0")" && pwd)
BASE=${MULTINODE_BASE:-/tmp/moemesh-multinode}
NET=${MULTINODE_NET:-10.231.7}      # n1 = .1, n2 = .2, this machine's end of the bridge = .254
RATE=${MULTINODE_RATE:-}            # e.g. 100mbit: every host's egress on the link (tc tbf); empty: unshaped
CPUS=${MULTINODE_CPUS:-2}           # advertised per host (the machine's cores are shared by both)
ACCOUNTING=${ACCOUNTING:-1}
PREFIX=mmn                          # netns mmn-n1/mmn-n2, bridge mmn-br, veth mmn-n1/mmn-n2 (mm0 inside)
IFACE=mm0                           # each host's cluster interface
HOSTS="n1 n2"
export SLURM_CONF=$BASE/etc/slurm.conf
t0=$(date +%s)
MULTINODE_BASE=$BASE bash "$HERE/down.sh" > /dev/null 2>&1 || true

need() { [ "$(id -u)" = 0 ] || { echo "up.sh: needs root (network namespaces)"; exit 1; }; command -v "$1" > /dev/null || { echo "up.sh: no $1 here"; exit 1; }; }
need ip; need tc; need unshare

# 1. packages (no-op when present)
pkgs="slurmctld slurmd slurm-client munge"
[ "$ACCOUNTING" = 1 ] && pkgs="$pkgs slurmdbd mariadb-server"
missing=""; for p in $pkgs; do dpkg -s "$p" > /dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing > /dev/null
fi
mkdir -p "$BASE"/{etc,state,spool/n1,spool/n2,log,run,munge}

# 2. the network: one namespace per host, a veth pair into a bridge on this machine
ip link add "$PREFIX-br" type bridge
ip addr add "$NET.254/24" dev "$PREFIX-br"
ip link set "$PREFIX-br" up
i=0
for h in $HOSTS; do
  i=$((i + 1))
  ns=$PREFIX-$h
  ip netns add "$ns"
  ip link add "$PREFIX-$h" type veth peer name "$IFACE" netns "$ns"
  ip link set "$PREFIX-$h" master "$PREFIX-br" up
  ip -n "$ns" addr add "$NET.$i/24" dev "$IFACE"
  ip -n "$ns" link set lo up
  ip -n "$ns" link set "$IFACE" up
  # on.sh mounts /etc/netns/<ns>/hosts over /etc/hosts for what it starts on the host: both
  # names resolve to their cluster addresses (never to loopback), as on a real cluster.
  mkdir -p "/etc/netns/$ns"
  { echo "127.0.0.1 localhost"; j=0; for g in $HOSTS; do j=$((j + 1)); echo "$NET.$j $g"; done; } > "/etc/netns/$ns/hosts"
done
on() { bash "$HERE/on.sh" "$@"; }
[ -n "$RATE" ] && bash "$HERE/shape.sh" "$RATE" > /dev/null   # tc tbf on every host's outgoing link traffic

# 3. munge: a private daemon (socket, key, pid under $BASE), shared by both hosts
chown munge:munge "$BASE/munge" && chmod 755 "$BASE/munge"   # munged: the socket's directory must be searchable by all
cp /etc/munge/munge.key "$BASE/munge/munge.key" 2> /dev/null || mungekey -c -k "$BASE/munge/munge.key"
chown munge:munge "$BASE/munge/munge.key" && chmod 400 "$BASE/munge/munge.key"
runuser -u munge -- /usr/sbin/munged --socket="$BASE/munge/munge.socket" --key-file="$BASE/munge/munge.key" \
  --pid-file="$BASE/munge/munged.pid" --log-file="$BASE/munge/munged.log" --seed-file="$BASE/munge/munged.seed"
for _ in $(seq 40); do munge -S "$BASE/munge/munge.socket" -n > /dev/null 2>&1 && break; sleep 0.25; done

# 4. config
MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 * 3 / 8 ))
cat > "$SLURM_CONF" <<EOF
ClusterName=mn
SlurmctldHost=n1($NET.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$BASE/munge/munge.socket
CredType=cred/munge
CommunicationParameters=NoInAddrAny
MailProg=/bin/true
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
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
SlurmdTimeout=30
MinJobAge=300
KillWait=5
SlurmdParameters=config_overrides
EOF
i=0
for h in $HOSTS; do
  i=$((i + 1))
  echo "NodeName=$h NodeAddr=$NET.$i CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN" >> "$SLURM_CONF"
done
echo "PartitionName=mn Nodes=$(echo $HOSTS | tr ' ' ,) Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO" >> "$SLURM_CONF"

if [ "$ACCOUNTING" = 1 ]; then
  cat >> "$SLURM_CONF" <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$NET.1
AccountingStoragePort=6819
AccountingStoragePass=$BASE/munge/munge.socket
EOF
  cat > "$BASE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$BASE/munge/munge.socket
DbdHost=n1
DbdAddr=$NET.1
DbdPort=6819
SlurmUser=root
PidFile=$BASE/run/slurmdbd.pid
LogFile=$BASE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$BASE/etc/slurmdbd.conf"
  # MariaDB on n1's loopback (its own namespace: no collision with .ci/slurm's on port 3307)
  mkdir -p "$BASE/db"
  mariadb-install-db --user=root --datadir="$BASE/db/data" --auth-root-authentication-method=socket \
    > "$BASE/log/mariadb-install.log" 2>&1
  on n1 setsid mariadbd --no-defaults --user=root --datadir="$BASE/db/data" --socket="$BASE/run/mysql.sock" \
    --bind-address=127.0.0.1 --port=3306 --pid-file="$BASE/run/mysqld.pid" --log-error="$BASE/log/mysqld.err" \
    --innodb-buffer-pool-size=32M --skip-name-resolve < /dev/null > /dev/null 2>&1 &
  for _ in $(seq 120); do mariadb -S "$BASE/run/mysql.sock" -e 'select 1' > /dev/null 2>&1 && break; sleep 0.25; done
  mariadb -S "$BASE/run/mysql.sock" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  on n1 slurmdbd   # daemonizes; finds slurmdbd.conf beside $SLURM_CONF
  for _ in $(seq 120); do sacctmgr -n list cluster > /dev/null 2>&1 && break; sleep 0.25; done
fi

# 5. the controller on n1, a node daemon on each host (each daemonizes, pid files under $BASE/run)
on n1 slurmctld
for h in $HOSTS; do on "$h" slurmd; done
for _ in $(seq 160); do [ "$(sinfo -h -o '%t' 2> /dev/null | sort -u)" = idle ] && [ "$(sinfo -h -o '%D')" = 2 ] && break; sleep 0.25; done
[ "$(sinfo -h -o '%t' | sort -u)" = idle ] || { echo "up.sh: the hosts are not idle"; sinfo; tail -20 "$BASE"/log/*.log; exit 1; }
if [ "$ACCOUNTING" = 1 ]; then
  for _ in $(seq 120); do sacctmgr -n -P list cluster format=cluster 2> /dev/null | grep -qx mn && break; sleep 0.25; done
fi

cat > "$BASE/env" <<EOF
MULTINODE_BASE=$BASE
MULTINODE_HOSTS="$HOSTS"
MULTINODE_ADDRS="$NET.1 $NET.2"
MULTINODE_IFACE=$IFACE
MULTINODE_NETNS="$PREFIX-n1 $PREFIX-n2"
MULTINODE_LINKS="$PREFIX-n1 $PREFIX-n2"
MULTINODE_RATE=$RATE
MULTINODE_SLURM_CONF=$SLURM_CONF
EOF
echo "multinode up in $(( $(date +%s) - t0 )) s: hosts n1=$NET.1 n2=$NET.2 on $IFACE${RATE:+, link shaped to $RATE}; export SLURM_CONF=$SLURM_CONF"
sinfo
