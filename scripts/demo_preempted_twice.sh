#!/bin/bash
# The main job on its default, preempted twice by SIGTERM (as a scheduler would), resumed each time, run to
# completion; then `telepathy status` and `telepathy plot`. About 2 minutes on 2 CPU cores.
#
#   scripts/demo_preempted_twice.sh [SAVE_DIR] [SECONDS_BEFORE_EACH_SIGTERM]
set -u
SAVE_DIR=${1:-runs/demo_preempted_twice}
AFTER=${2:-30}
PYTHON=${PYTHON:-python}
if [ -e "$SAVE_DIR" ]; then
    echo "$SAVE_DIR exists; pass a new directory (this demo starts a run from scratch)" >&2
    exit 2
fi
mkdir -p "$(dirname "$SAVE_DIR")"
for round in 1 2; do
    "$PYTHON" -m telepathy.preemptible_training --save_dir "$SAVE_DIR" --auto_resume >"$SAVE_DIR.run$round.log" 2>&1 &
    pid=$!
    sleep "$AFTER"
    kill -TERM "$pid"
    wait "$pid"
    echo "run $round: preempted with SIGTERM after ${AFTER}s, exit code $? (99: saved, ready to resume)"
done
"$PYTHON" -m telepathy.preemptible_training --save_dir "$SAVE_DIR" --auto_resume >"$SAVE_DIR.run3.log" 2>&1
echo "run 3: exit code $? (0: complete)"
"$PYTHON" -m telepathy status "$SAVE_DIR"
"$PYTHON" -m telepathy plot "$SAVE_DIR"
