#!/usr/bin/env bash
# A software TPM for `ivp gateway --device tpm` outside the tests (which start their own
# through ivp.device.swtpm). One swtpm per device, on loopback only.
#   scripts/swtpm.sh start STATE_DIR [PORT]   # prints the --tpm TCTI to use
#   scripts/swtpm.sh stop STATE_DIR
set -euo pipefail
cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop STATE_DIR [PORT]" >&2; exit 2; }
case "$cmd" in
start)
	"$(dirname "$0")/system-deps.sh"
	port=${3:-2321}
	mkdir -p "$dir"
	if [ -f "$dir/swtpm.pid" ] && kill -0 "$(cat "$dir/swtpm.pid")" 2>/dev/null; then
		echo "swtpm:host=127.0.0.1,port=$(cat "$dir/swtpm.port")"; exit 0
	fi
	swtpm socket --tpm2 --tpmstate "dir=$dir" --daemon --pid "file=$dir/swtpm.pid" \
		--server "type=tcp,port=$port,bindaddr=127.0.0.1" \
		--ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" \
		--flags not-need-init,startup-clear --log "file=$dir/swtpm.log"
	echo "$port" > "$dir/swtpm.port"
	echo "swtpm:host=127.0.0.1,port=$port" ;;
stop)
	[ -f "$dir/swtpm.pid" ] && kill "$(cat "$dir/swtpm.pid")" 2>/dev/null || true
	rm -f "$dir/swtpm.pid" ;;
*) echo "usage: $0 start|stop STATE_DIR [PORT]" >&2; exit 2 ;;
esac
