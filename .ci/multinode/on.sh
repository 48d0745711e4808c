#!/usr/bin/env bash
# Run a command on a host of the two-host test cluster (.ci/multinode/up.sh):
#   bash .ci/multinode/on.sh n1 torchrun --nnodes=2 --node_rank=0 ...
# The command runs in the host's network namespace (its interfaces and address), sees the
# host's /etc/hosts (a private mount namespace binds /etc/netns/<ns>/hosts over it; /sys and
# its cgroups stay as they are, which slurmd needs) and has the host's name as its hostname
# (a UTS namespace of its own). What it starts inherits all three.
set -euo pipefail
host=${1:?usage: on.sh HOST COMMAND...}
shift
ns=mmn-$host
[ -e "/run/netns/$ns" ] || { echo "on.sh: no host $host (bash .ci/multinode/up.sh starts n1 and n2)" >&2; exit 2; }
exec nsenter --net="/run/netns/$ns" unshare --mount --uts --propagation private \
  sh -c 'mount --bind "/etc/netns/$1/hosts" /etc/hosts && hostname "$0" && shift && exec "$@"' "$host" "$ns" "$@"
