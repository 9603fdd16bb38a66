#!/bin/bash
# Stop/restart cycles: SIGTERM/SIGINT to `ensemble serve`'s process group, each followed at once by a new one.
cd "$(dirname "$0")/.."
LOG=${LOG:-/tmp/restart_cycles.log}; : > $LOG
# Usage: scripts/restart_cycles.sh   (needs the demo built; ~8 min; prints its log at the end)
start() { setsid .venv/bin/ensemble serve --config deploy/local.yaml --port 8124 > /tmp/restart_serve_$1.log 2>&1 & echo $!; }
wait_ready() { for i in $(seq 1 900); do grep -q "gateway ready in" /tmp/restart_serve_$1.log && return 0; kill -0 $2 2>/dev/null || return 1; sleep 1; done; return 1; }
PREV=""
for c in 1 2 3; do
  P=$(start $c); echo "$(date +%T) cycle $c: started pid $P" >> $LOG
  wait_ready $c $P && echo "$(date +%T) cycle $c: ready ($(grep -o 'ready in [0-9]* s' /tmp/restart_serve_$c.log))" >> $LOG || echo "$(date +%T) cycle $c: NOT ready: $(tail -3 /tmp/restart_serve_$c.log)" >> $LOG
  grep -h "waiting up to\|reaped" /tmp/restart_serve_$c.log >> $LOG
  SIG=$([ $((c % 2)) = 1 ] && echo TERM || echo INT)
  kill -$SIG -- -$P; echo "$(date +%T) cycle $c: SIG$SIG to group $P, starting the next at once" >> $LOG
  PREV=$P
done
P=$(start 4); echo "$(date +%T) final: started pid $P" >> $LOG
wait_ready 4 $P && echo "$(date +%T) final: ready" >> $LOG
grep -h "waiting up to\|reaped" /tmp/restart_serve_4.log >> $LOG
M=$(pgrep -f "ServeReplica:ensemble:expert-math" | head -1); kill -KILL $M; echo "$(date +%T) SIGKILL expert-math replica $M" >> $LOG
for i in $(seq 1 300); do N=$(pgrep -f "ServeReplica:ensemble:expert-math" | head -1); [ -n "$N" ] && [ "$N" != "$M" ] && break; sleep 1; done
echo "$(date +%T) new math replica: $N" >> $LOG
sleep 20
echo "VLLM engines now: $(ps -eo comm | grep -c VLLM) (4 experts x 2 processes expected)" >> $LOG
echo "orphaned VLLM (ppid 1): $(ps -eo ppid,comm | awk '$1==1 && $2 ~ /VLLM/' | wc -l)" >> $LOG
kill -TERM -- -$P; wait $P 2>/dev/null; for i in $(seq 1 120); do kill -0 $P 2>/dev/null || break; sleep 1; done
sleep 5
echo "$(date +%T) after the last stop: VLLM processes: $(ps -eo comm | grep -c VLLM), ray processes: $(pgrep -c -f 'raylet|gcs_server') , free: $(free -g | awk '/Mem/{print $7}') GiB available" >> $LOG
cat $LOG
