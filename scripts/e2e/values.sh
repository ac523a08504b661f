# shellcheck shell=bash
# Sourced by scripts/e2e-guest: the e2e value checks.
#
# values_start  after both guests run: scripts/e2e/host-values.py takes
#               independent readings (libvirt per-domain calls, /proc)
#               bracketing reads of the metrics disk, and timestamps the
#               full guest's READ/BURN markers, into OUT/values.jsonl;
# values_stop   once the full guest is off (and from the EXIT trap).
# The history (<history state_dir="@HISTORY_DIR@">) goes to OUT/history;
# tests/e2e/test_e2e_guest.py reads it back with vhostmdctl.

VALUES_PID=""

values_conf() {  # CONF: fill in the history directory (a fresh one per run)
    rm -rf "$OUT/history"
    sed -i -e "s|@HISTORY_DIR@|$OUT/history|g" "$1"
}

values_start() {
    rm -f "$OUT/values.jsonl"
    timeout 400 "$PY" "$HERE/host-values.py" --uri "$URI" --disk "$MDISK" \
        --out "$OUT/values.jsonl" --domain "$FULL" --domain "$MINI" \
        --console "$OUT/$FULL-console.log" --max-seconds 380 \
        > "$OUT/host-values.log" 2>&1 < /dev/null &
    VALUES_PID=$!
    echo "host-values $VALUES_PID" >> "$OUT/started-pids"
}

values_stop() {
    [ -n "$VALUES_PID" ] || return 0
    kill -TERM "$VALUES_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$VALUES_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$VALUES_PID" 2>/dev/null || true
    wait "$VALUES_PID" 2>/dev/null || true
    VALUES_PID=""
}
