#!/bin/bash
# The cluster's shape on one machine, measured: deploy/local-replicas.yaml with 2 gateway replicas, then the same
# file with 1; for each: time to /health ok, memory in use, and `ensemble soak` at 32 streams for 1 minute
# (req/s, latency, rows logged once, open sessions per expert replica). ~9 min; needs the demo built.
# Usage: scripts/replicas_compare.sh        (results: $OUT/replicas.log and $OUT/soak-gw{1,2}.json)
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/replicas_compare}; mkdir -p $OUT; : > $OUT/replicas.log
python3 -c "
import sys; s = sys.stdin.read(); old = '      gateway:\n        num_replicas: 2'
assert old in s; sys.stdout.write(s.replace(old, '      gateway:\n        num_replicas: 1'))" < deploy/local-replicas.yaml > $OUT/local-replicas-1gw.yaml
measure() {   # CONFIG LABEL PORT
  export ENSEMBLE_STORE_URL=sqlite:///$OUT/traffic-$2.db
  idle=$(free -m | awk '/Mem/{print $3}')
  setsid .venv/bin/ensemble serve --config $1 --port $3 > $OUT/serve-$2.log 2>&1 &
  local pid=$! t0=$(date +%s)
  for i in $(seq 1 400); do
    curl -s -m 5 http://127.0.0.1:$3/health | grep -q '"status":"ok"' && break; sleep 2
  done
  sleep 5
  echo "[$2] ready in $(( $(date +%s) - t0 )) s; memory in use $(( $(free -m | awk '/Mem/{print $3}') - idle )) MiB above idle" >> $OUT/replicas.log
  .venv/bin/ensemble soak --config $1 --url http://127.0.0.1:$3 --clients 32 --minutes 1 --max-tokens 32 --pid $pid \
      --json > $OUT/soak-$2.json 2> $OUT/soak-$2.err
  python3 -c "import json; r = json.load(open('$OUT/soak-$2.json')); r.pop('processes'); print('[$2]', r)" >> $OUT/replicas.log
  kill -TERM -- -$pid
  for i in $(seq 1 120); do kill -0 $pid 2>/dev/null || break; sleep 1; done
  for i in $(seq 1 60); do pgrep -f "VLLM|raylet" > /dev/null || break; sleep 1; done
}
measure deploy/local-replicas.yaml gw2 8100
measure $OUT/local-replicas-1gw.yaml gw1 8101
cat $OUT/replicas.log
