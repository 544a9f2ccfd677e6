#!/bin/bash
# No-change reruns of deploys/site.py: the code at an older revision (checked out with its own
# .venv in /tmp/old: git clone . /tmp/old && cd /tmp/old && git checkout REV && make setup) against this
# checkout, alternating on the same converged lab (make demo first). Prints seconds and the Grand total.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
set -e
cp "$ROOT"/inventories/lab/{ca.crt,hosts.yml,secrets.age,secrets.recipients} /tmp/old/inventories/lab/
t() { local s=$(date +%s.%N); "$@" > /tmp/nc.out 2>&1 || { tail -20 /tmp/nc.out; exit 1; }; local e=$(date +%s.%N); echo "$(echo "$e - $s" | bc) $(grep 'Grand total' /tmp/nc.out | awk '{print $3,$4,$5,$6}')"; }
for side in old new old new; do
  if [ $side = old ]; then d=/tmp/old; else d="$ROOT"; fi
  cd $d
  echo "$side converge: $(t .venv/bin/pyinfra -y inventories/lab.py deploys/site.py)"
  for i in 1 2 3; do echo "$side rerun $i: $(t .venv/bin/pyinfra -y inventories/lab.py deploys/site.py)"; done
done
