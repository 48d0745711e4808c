#!/usr/bin/env bash
# Shape the link between the test cluster's hosts (.ci/multinode/up.sh), or stop shaping it:
#   bash .ci/multinode/shape.sh 200mbit     # every host's outgoing traffic on the link: tc tbf at 200 Mbit/s
#   bash .ci/multinode/shape.sh off
# Traffic between two ranks of one host never crosses the link (it stays on the host's loopback).
# MULTINODE_QUEUE (25ms): the longest a packet may wait in the shaper before it is dropped.
# MULTINODE_BURST (64kb): the token bucket; a larger one lets that many bytes pass unshaped after
# an idle gap (benchmarks/RESULTS.md measures the All-to-All at 64kb, 1mb and 4mb).
set -euo pipefail
rate=${1:?usage: shape.sh RATE (e.g. 200mbit) | off}
for ns in mmn-n1 mmn-n2; do
  [ -e "/run/netns/$ns" ] || { echo "shape.sh: no $ns (bash .ci/multinode/up.sh starts the hosts)" >&2; exit 2; }
  if [ "$rate" = off ]; then
    ip netns exec "$ns" tc qdisc del dev mm0 root 2> /dev/null || true
  else
    ip netns exec "$ns" tc qdisc replace dev mm0 root tbf rate "$rate" burst "${MULTINODE_BURST:-64kb}" latency "${MULTINODE_QUEUE:-25ms}"
  fi
done
ip netns exec mmn-n1 tc qdisc show dev mm0
