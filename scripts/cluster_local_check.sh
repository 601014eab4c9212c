#!/usr/bin/env bash
# `ray up` and `ray down` of cloud/cluster/onprem.yaml, for real, against 127.0.0.1 over SSH: sshd bound to loopback
# (port 22, else a free port through nc), a temporary user with a generated key, the file's own commands (head_ip 127.0.0.1, no workers).
# Then: gRPC health and one edge-agent run against the cluster's front (TLS + token, as the cluster serves them),
# `ray down`, and a check that none of the user's processes is left (ray, raylet, gcs_server, rapnet-cloud).
#
#   sudo scripts/cluster_local_check.sh                 # the user's venv is a link to this checkout's .venv
#   sudo scripts/cluster_local_check.sh --full-install  # a fresh venv from PyPI for the user (torch==2.13.0)
#
# Needs root (useradd, sshd) and `apt-get install -y openssh-server rsync`. Ports 6379, 8080, 9464 and 50051 on
# 127.0.0.1 must be free. The temporary user, its home, sshd and the work folder are removed on exit. With the
# default (link), /root is made traversable (o+x, no listing) for the run, since the venv's interpreter lives
# there, and put back on exit. Not run in CI.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
FULL_INSTALL=0
[[ "${1:-}" == "--full-install" ]] && FULL_INSTALL=1
[[ $(id -u) == 0 ]] || { echo "cluster_local_check: run as root (it adds a user and starts sshd)" >&2; exit 2; }
for tool in /usr/sbin/sshd rsync; do command -v $tool > /dev/null || { echo "cluster_local_check: no $tool: apt-get install -y openssh-server rsync" >&2; exit 2; }; done

CHECK_USER=rapnetcheck
WORK=$(mktemp -d /tmp/rapnet-cluster-check.XXXXXX)
chmod 755 "$WORK"
ROOT_MODE=$(stat -c %a /root)
SSHD_PID=""
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

free_port() { "$REPO/.venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
user_procs() { pgrep -u "$CHECK_USER" -a 2>/dev/null || true; }

LOGS=/tmp/rapnet-cluster-check-logs  # kept after the run: ray up / down, sshd and the front's log
cleanup() {
    set +e
    rm -rf "$LOGS" && mkdir -p "$LOGS" && cp "$WORK"/*.log "$LOGS"/ 2>/dev/null
    [[ -n "${HOME_DIR:-}" ]] && cp "$HOME_DIR/rapnet-cloud.log" "$LOGS"/ 2>/dev/null
    [[ -n "${HOME_DIR:-}" ]] && cp -r "$HOME_DIR/rt/ray/session_latest/logs" "$LOGS/ray" 2>/dev/null
    if id "$CHECK_USER" >/dev/null 2>&1; then
        pkill -KILL -u "$CHECK_USER" 2>/dev/null  # only this run's user owns these
        sleep 1
        userdel -r "$CHECK_USER" 2>/dev/null
    fi
    [[ -n "$SSHD_PID" ]] && kill "$SSHD_PID" 2>/dev/null
    chmod "$ROOT_MODE" /root
    rm -rf "$WORK"
}
trap cleanup EXIT

for port in 6379 8080 9464 50051; do
    port_free "$port" || { echo "cluster_local_check: 127.0.0.1:$port is in use; the cluster file needs it" >&2; exit 2; }
done
id "$CHECK_USER" >/dev/null 2>&1 && { echo "cluster_local_check: user $CHECK_USER exists (a run left it?)" >&2; exit 2; }

log "user $CHECK_USER, key, sshd on 127.0.0.1"
useradd -m -s /bin/bash -p "*" "$CHECK_USER"  # "*": no password, yet not locked (sshd refuses locked users)
HOME_DIR=$(getent passwd "$CHECK_USER" | cut -d: -f6)
ssh-keygen -q -t ed25519 -N "" -f "$WORK/id_ed25519" -C rapnet-cluster-check
install -d -m 700 -o "$CHECK_USER" -g "$CHECK_USER" "$HOME_DIR/.ssh"
install -m 600 -o "$CHECK_USER" -g "$CHECK_USER" "$WORK/id_ed25519.pub" "$HOME_DIR/.ssh/authorized_keys"
# Ray's default temp dir (/tmp/ray) belongs to whoever ran Ray first on this host: the user gets its own.
printf 'export RAY_TMPDIR="$HOME/rt"\nexport RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0\n' > "$HOME_DIR/.bashrc"  # one node: Ray's local-only mode, every port on 127.0.0.1
chown "$CHECK_USER:$CHECK_USER" "$HOME_DIR/.bashrc"
# Ray's cluster file has no SSH port setting: port 22 on 127.0.0.1 (ssh_proxy_command when a sshd holds it).
SSH_PORT=22
if ! port_free 22; then
    SSH_PORT=$(free_port)
    command -v nc > /dev/null || { echo "cluster_local_check: port 22 is taken and there is no nc for a proxy" >&2; exit 2; }
fi
ssh-keygen -q -t ed25519 -N "" -f "$WORK/host_key"
cat > "$WORK/sshd_config" <<EOF
ListenAddress 127.0.0.1
Port $SSH_PORT
HostKey $WORK/host_key
PidFile $WORK/sshd.pid
AllowUsers $CHECK_USER
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
AcceptEnv none
EOF
mkdir -p /run/sshd
/usr/sbin/sshd -D -e -f "$WORK/sshd_config" 2> "$WORK/sshd.log" &
SSHD_PID=$!
for _ in $(seq 20); do port_free "$SSH_PORT" || break; sleep 0.5; done
ssh -q -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -i "$WORK/id_ed25519" \
    -p "$SSH_PORT" "$CHECK_USER@127.0.0.1" true || { cat "$WORK/sshd.log"; exit 1; }

log "secrets: dev CA + server cert for 127.0.0.1, token (the CA key stays in $WORK/secrets)"
"$REPO/.venv/bin/rapnet-cloud" make-dev-cert --out "$WORK/secrets" > /dev/null
"$REPO/.venv/bin/rapnet-cloud" make-token --out "$WORK/secrets/token.txt" > /dev/null

if [[ $FULL_INSTALL == 0 ]]; then
    chmod o+x /root  # the venv's interpreter is under /root/.pyenv
    ln -s "$REPO/.venv" "$HOME_DIR/venv"
    chown -h "$CHECK_USER:$CHECK_USER" "$HOME_DIR/venv"
fi

# The cluster file as shipped, with only what this host changes: the head's address, no workers, the SSH port and
# user, the secrets' local paths, and (with the link) no pip commands, which the read-only venv refuses.
"$REPO/.venv/bin/python" - "$REPO/cloud/cluster/onprem.yaml" "$WORK" "$CHECK_USER" "$SSH_PORT" "$FULL_INSTALL" <<'EOF'
import sys, yaml
src, work, user, ssh_port, full = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1"
cfg = yaml.safe_load(open(src))
cfg["cluster_name"] = "rapnet-local-check"
cfg["provider"].update(head_ip="127.0.0.1", worker_ips=[])
cfg["max_workers"] = 0
cfg["auth"] = {"ssh_user": user, "ssh_private_key": f"{work}/id_ed25519"}
if ssh_port != "22":
    cfg["auth"]["ssh_proxy_command"] = f"nc 127.0.0.1 {ssh_port}"
cfg["file_mounts"] = {remote: local.replace("~/rapnet-secrets", f"{work}/secrets") for remote, local in cfg["file_mounts"].items()}
setup = []
for cmd in cfg["setup_commands"]:
    if "pip install" in cmd:
        if not full:
            continue
        if "torch==" in cmd:
            cmd = "pip install torch==2.13.0"  # PyPI, the registry this host reaches
    setup.append(cmd)
cfg["setup_commands"] = setup
yaml.safe_dump(cfg, open(f"{work}/cluster.yaml", "w"), sort_keys=False)
EOF
echo "secrets mounted: $(grep -o "rapnet-secrets/[a-z.]*:" "$WORK/cluster.yaml" | tr -d : | xargs)"

cd "$REPO"
export RAY_USAGE_STATS_ENABLED=0
log "ray up"
T0=$(date +%s)
.venv/bin/ray up -y --no-config-cache "$WORK/cluster.yaml" 2>&1 | tee "$WORK/ray_up.log" | grep -E "SERVING|rapnet-cloud|Ray runtime started|up-to-date|Cluster|failed|Error|error" | tail -n 25
UP_RC=${PIPESTATUS[0]}
log "ray up exit code $UP_RC after $(( $(date +%s) - T0 )) s"
[[ $UP_RC == 0 ]] || { grep -v "^[^ ]*$" "$WORK/ray_up.log" | tail -n 40; exit 1; }
[[ -e "$HOME_DIR/rapnet-secrets/ca.key" ]] && { echo "FAIL: the CA key reached the node" >&2; exit 1; }
echo "on the node: $(ls "$HOME_DIR/rapnet-secrets" | xargs)"

log "health and one edge-agent run against 127.0.0.1:50051 (TLS, token)"
.venv/bin/rapnet-cloud health --target 127.0.0.1:50051 --tls-ca "$WORK/secrets/ca.pem"
# A slow device and price 0 (the deepest exit) make the planner offload: the frames go to the cluster.
.venv/bin/edge-agent --cloud 127.0.0.1:50051 --tls-ca "$WORK/secrets/ca.pem" --token-file "$WORK/secrets/token.txt" \
    --runtime torch --dataset imagenette --limit 20 --device-gflops 0.5 --price 0 --quiet 2>&1 | tee "$WORK/agent.log" | tail -n 12
AGENT_RC=${PIPESTATUS[0]}
CLOUD_CALLS=$(grep -o 'cloud queue [0-9.]* ms ([0-9]* calls)' "$WORK/agent.log" | grep -o '([0-9]*' | tr -d '(')
log "edge-agent exit code $AGENT_RC, ${CLOUD_CALLS:-no} calls to the cluster"

log "ray down"
.venv/bin/ray down -y "$WORK/cluster.yaml" 2>&1 | tee "$WORK/ray_down.log" | grep -E "Stopped|stopped|Destroying|remaining|command not found" | tail -n 8
log "processes of $CHECK_USER after ray down (waiting up to 30 s):"
LEFT=""
for _ in $(seq 30); do
    LEFT=$(user_procs | grep -E "ray|raylet|gcs_server|rapnet-cloud|python" || true)
    [[ -z "$LEFT" ]] && break
    sleep 1
done
if [[ -n "$LEFT" ]]; then
    echo "FAIL: left running after ray down:"; echo "$LEFT"; tail -n 20 "$HOME_DIR/rapnet-cloud.log"; exit 1
fi
echo "none"
tail -n 3 "$HOME_DIR/rapnet-cloud.log"
[[ $AGENT_RC == 0 ]] || { echo "FAIL: edge-agent exit code $AGENT_RC" >&2; exit 1; }
[[ ${CLOUD_CALLS:-0} -gt 0 ]] || { echo "FAIL: the edge-agent sent nothing to the cluster" >&2; exit 1; }
log "PASS"
