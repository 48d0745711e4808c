#!/usr/bin/env bash
# Commit subjects of at most 72 characters, for every commit after the one the rule began at
# (older history is left as it is). Run by .ci/run; .githooks/commit-msg checks the same locally.
set -euo pipefail
cd "$(dirname "$0")/.."
since=35ae3373be2e99b61f9aa7323c1203c08baf28ce  # the last commit before the rule
if ! git cat-file -e "$since^{commit}" 2>/dev/null; then
  echo "commit subjects: $since is not in this clone (shallow?); not checked"
  exit 0
fi
long=$(git log --format='%h%x09%s' "$since..HEAD" | awk -F '\t' 'length($2) > 72 {print $1 " (" length($2) "): " $2}')
if [ -n "$long" ]; then
  echo "commit subjects longer than 72 characters (put the why in the body):"
  echo "$long"
  exit 1
fi
echo "commit subjects: $(git rev-list --count "$since..HEAD") commits, each subject <= 72 characters"
