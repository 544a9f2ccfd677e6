#!/bin/bash
# No-change reruns of deploys/site.py: the code at an older revision (checked out with its own
# .venv in /tmp/old: git clone . /tmp/old && cd /tmp/old && git checkout REV && make setup) against this
# checkout, alternating on the same converged lab (make demo first), limited to the hosts both know
# (HOSTS, default the twelve of 9a4b5f4's lab that kept their roles). The old side gets a hosts.yml
# rendered from its own lab/fleet.yml. Prints seconds and the Grand total of each run.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOSTS=${HOSTS:-"lb1 lb2 app1 app2 db1 db2 db3 db4 backup1 spare1 spare2 drill1"}
set -e
cp "$ROOT"/inventories/lab/{ca.crt,secrets.age,secrets.recipients} /tmp/old/inventories/lab/
(cd /tmp/old && .venv/bin/python -c "
from lab.cli import render_inventory
from lab.config import load_fleet, DEFAULT_FLEET
open('inventories/lab/hosts.yml', 'w').write(render_inventory(load_fleet(DEFAULT_FLEET)))")
LIMIT=$(for h in $HOSTS; do printf -- '--limit %s ' "$h"; done)
t() { local s=$(date +%s.%N); "$@" > /tmp/nc.out 2>&1 || { tail -20 /tmp/nc.out; exit 1; }; local e=$(date +%s.%N); echo "$(echo "$e - $s" | bc) $(grep 'Grand total' /tmp/nc.out | awk '{print $3,$4,$5,$6}')"; }
for side in old new old new; do
  if [ $side = old ]; then d=/tmp/old; else d="$ROOT"; fi
  cd $d
  echo "$side converge: $(t .venv/bin/pyinfra -y inventories/lab.py deploys/site.py $LIMIT)"
  for i in 1 2 3; do echo "$side rerun $i: $(t .venv/bin/pyinfra -y inventories/lab.py deploys/site.py $LIMIT)"; done
done
# Back to this checkout's whole inventory (the old side rewrote what it manages on its hosts).
cd "$ROOT" && echo "restore: $(t .venv/bin/pyinfra -y inventories/lab.py deploys/site.py)"
