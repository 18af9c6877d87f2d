#!/usr/bin/env bash
# Installs and starts what hotbed needs on a Debian 12 host: dockerd with gVisor
# (runsc) registered, Redis, mmdebstrap and busybox-static. Idempotent: each step
# checks before it acts, so `make demo` and `make test` can both call it.
#
# Why trixie's runsc: bookworm's runsc (20221219) fails statx on this kernel;
# trixie's 20240729 build is static and works. The trixie suite is pinned low so
# nothing else is upgraded from it.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '[host-setup] %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    log "must run as root (apt, dockerd); try: sudo $0"; exit 1
  fi
}

apt_ready=0
apt_update() {
  if [ "$apt_ready" = 0 ]; then
    log "apt-get update"
    apt-get update -qq >/dev/null
    apt_ready=1
  fi
}

install_debian_packages() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
  # systemd-analyze, for the test that verifies deploy/systemd/*.service (installing the
  # package does not make systemd PID 1; nothing else changes on the host).
  command -v systemd-analyze >/dev/null || missing+=(systemd)
  command -v openssl >/dev/null || missing+=(openssl)
  # A registry on loopback, for the tests that pull (tests/test_images.py starts its own).
  command -v docker-registry >/dev/null || missing+=(docker-registry)
  [ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -q '^wget$' || missing+=(busybox-static)
  if [ ${#missing[@]} -gt 0 ]; then
    need_root; apt_update
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The redis-server package starts a system instance; hotbed manages its own.
    if command -v systemctl >/dev/null && systemctl is-active -q redis-server 2>/dev/null; then
      systemctl stop redis-server || true
    fi
    # Likewise the docker-registry package's system service: the tests start their own.
    if command -v systemctl >/dev/null && systemctl is-enabled -q docker-registry 2>/dev/null; then
      systemctl disable --now docker-registry || true
    fi
  fi
}

debian_mirror() {
  # Reuse the mirror of the system's own Debian source so no new host is contacted.
  local uri=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    uri=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
    uri=$(awk '/^deb / && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

runsc_works() {
  command -v runsc >/dev/null || return 1
  local v; v=$(runsc --version 2>/dev/null | awk '/runsc version/ {print $3}')
  # Debian's 20221219 build is broken on this kernel (statx EINVAL); versions
  # read like "0.0~20240729.0" or "release-20240729.0": take the date.
  local d; d=$(grep -o '20[0-9]\{6\}' <<<"$v" | head -1)
  [ -n "$d" ] && [ "$d" -ge 20240101 ]
}

install_runsc() {
  runsc_works && return 0
  need_root
  local mirror; mirror=$(debian_mirror)
  if [ ! -f /etc/apt/sources.list.d/hotbed-trixie.sources ]; then
    log "adding the trixie suite ($mirror), pinned low, for runsc"
    cat >/etc/apt/sources.list.d/hotbed-trixie.sources <<SRC
Types: deb
URIs: $mirror
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    cat >/etc/apt/preferences.d/hotbed-trixie <<PIN
Package: *
Pin: release n=trixie
Pin-Priority: 100
PIN
    apt_ready=0
  fi
  apt_update
  log "installing runsc from trixie"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t trixie runsc >/dev/null
  runsc_works || { log "runsc installed but not usable: $(runsc --version 2>&1 | head -1)"; exit 1; }
}

configure_docker() {
  local want='/etc/docker/daemon.json'
  # "runsc" is hotbed's wrapper (deploy/runsc/runsc-hotbed): plain runsc, except that
  # the worker's restores run `runsc restore` straight from the snapshot, without
  # containerd copying the image, and checkpoints are written uncompressed.
  # "runsc-plain" is runsc alone (a worker configured with it restores through
  # `docker start --checkpoint`). "runsc-ptrace" is the wrapper on gVisor's ptrace
  # platform: process creation 2.3x faster than systrap on this kind of VM, syscalls
  # slower (bench/README.md, "exec"); a worker opts in with HOTBED_OCI_RUNTIME.
  # "live-restore": sandboxes keep running while dockerd restarts (an upgrade, a
  # crash); the worker rides out the outage and finds them running after it.
  # "runsc-net" is the wrapper with gVisor's own network stack, only for sandboxes
  # whose network is "egress" or "open": the worker puts them in a namespace on its
  # bridge and filters them on the host (docs/operations.md, "Sandbox network").
  # gVisor's stack (not the kernel's, --network=host) because runsc can checkpoint it:
  # pause, snapshots and templates work with a network. --net-disconnect-ok: a
  # checkpoint drops open TCP connections instead of failing (and ending the sandbox).
  # Every other runtime keeps --network=none.
  local runsc_bin; runsc_bin=$(command -v runsc)
  local runsc_path=/usr/local/lib/hotbed/runsc-hotbed
  install -D -m 0755 "$ROOT/deploy/runsc/runsc-hotbed" "$runsc_path"
  local body gpu_runtime=""
  # GPU nodes (an NVIDIA driver is present) also get runsc with --nvproxy, which
  # hotbed uses for GPU sandboxes only (workers: gpu_oci_runtime = "runsc-nvproxy").
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpu_runtime=", \"runsc-nvproxy\": {\"path\": \"$runsc_bin\", \"runtimeArgs\": [\"--network=none\", \"--nvproxy=true\"]}"
  fi
  body=$(cat <<JSON
{
  "runtimes": {"runsc": {"path": "$runsc_path", "runtimeArgs": ["--network=none"]},
               "runsc-plain": {"path": "$runsc_bin", "runtimeArgs": ["--network=none"]},
               "runsc-ptrace": {"path": "$runsc_path", "runtimeArgs": ["--network=none", "--platform=ptrace"]},
               "runsc-net": {"path": "$runsc_path", "runtimeArgs": ["--network=sandbox", "--net-disconnect-ok"]}$gpu_runtime},
  "experimental": true,
  "live-restore": true,
  "bridge": "none",
  "iptables": false,
  "ip-masq": false
}
JSON
)
  mkdir -p /etc/docker
  if [ ! -f "$want" ] || [ "$(cat "$want")" != "$body" ]; then
    local before=""; [ -f "$want" ] && before=$(grep -v -e '"runsc' -e '^ *"runtimes"' "$want" || true)
    log "writing $want (runsc registered, no bridge network)"
    printf '%s\n' "$body" >"$want"
    if docker_up; then
      if [ -n "$before" ] && [ "$before" = "$(grep -v -e '"runsc' -e '^ *"runtimes"' "$want")" ]; then
        # Only the runtimes changed: dockerd reloads those on SIGHUP, and the
        # sandboxes running now keep running (a restart would end them).
        log "reloading dockerd's runtimes"
        local pid; pid=$(cat /var/run/docker.pid 2>/dev/null || pgrep -o -x dockerd || true)
        [ -n "$pid" ] && kill -HUP "$pid" || true
        for _ in $(seq 50); do docker info --format '{{json .Runtimes}}' | grep -q 'net-disconnect-ok' && break; sleep 0.2; done
      else
        log "restarting dockerd to pick up the runtime"
        stop_dockerd
      fi
    fi
  fi
}

docker_up() { timeout 10 docker info >/dev/null 2>&1; }

stop_dockerd() {
  if command -v systemctl >/dev/null && systemctl is-active -q docker 2>/dev/null; then
    systemctl restart docker; return
  fi
  pkill -x dockerd || true
  for _ in $(seq 50); do pgrep -x dockerd >/dev/null || break; sleep 0.2; done
}

start_dockerd() {
  docker_up && return 0
  need_root
  log "starting dockerd"
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl start docker || true
  fi
  if ! docker_up; then
    mkdir -p /var/log/hotbed
    # A daemon must not inherit our other descriptors (a caller's lock file, say).
    (
      for fd in /proc/$BASHPID/fd/*; do
        fd=${fd##*/}; [ "$fd" -gt 2 ] && eval "exec $fd>&-"
      done
      exec nice -n "$ENGINE_NICE" setsid nohup dockerd >/var/log/hotbed/dockerd.log 2>&1 </dev/null
    ) &
  fi
  for _ in $(seq 150); do docker_up && break; sleep 0.2; done
  docker_up || { log "dockerd did not come up; see /var/log/hotbed/dockerd.log"; tail -20 /var/log/hotbed/dockerd.log >&2 || true; exit 1; }
  docker info --format '{{json .Runtimes}}' | grep -q runsc || { log "dockerd runs but runsc is not registered"; exit 1; }
}

# Sandboxes must never starve the control plane on their node: Redis, the scheduler
# and the worker answer in milliseconds only if a burst of restores cannot take both
# cores from them. The container engine (and so every runsc it starts: nice is
# inherited) runs at a lower CPU priority. Systemd hosts: deploy/systemd/*.service.d.
ENGINE_NICE=${HOTBED_ENGINE_NICE:-10}
lower_engine_priority() {
  # Every thread: Go forks from any of them, and a child inherits its thread's nice.
  local p t
  for p in $(pgrep -x dockerd) $(pgrep -x containerd); do
    for t in /proc/"$p"/task/*; do
      renice -n "$ENGINE_NICE" -p "${t##*/}" >/dev/null 2>&1 || true
    done
  done
}

# nice works only among processes of one cgroup: each sandbox lives in its own cgroup
# under the parent the worker gives it ("hotbed", workers/config.py cgroup_parent), and
# that parent competes with Redis, the scheduler and the worker as one nice-0 process
# would. Other containers on the host (under "docker") keep the default weight.
# Measured here (bench start: warm claims while the pool controller restores 8
# replacements): claim p99 89-250 ms at the default weight, 5-34 ms at 128. Sandboxes
# still get every cycle the control plane leaves idle, but less when it is saturated:
# under 8 clients creating back to back, some execs into busybox sandboxes (docker
# exec) waited past 30 s at 64 and at 128. cgroupfs driver only; systemd hosts:
# docs/operations.md.
SANDBOX_CPU_SHARES=${HOTBED_SANDBOX_CPU_SHARES:-128}
lower_sandbox_cpu_weight() {
  local driver; driver=$(docker info --format '{{.CgroupDriver}}' 2>/dev/null || true)
  if [ "$driver" != cgroupfs ]; then
    log "cgroup driver ${driver:-unknown}: set the sandboxes' CPU weight as docs/operations.md says"
    return 0
  fi
  local file value
  if [ -d /sys/fs/cgroup/cpu ]; then  # cgroup v1
    file=/sys/fs/cgroup/cpu/hotbed/cpu.shares value=$SANDBOX_CPU_SHARES
  elif [ -f /sys/fs/cgroup/cgroup.controllers ]; then  # cgroup v2: weight 1..10000, default 100
    echo +cpu >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
    file=/sys/fs/cgroup/hotbed/cpu.weight value=$(( (SANDBOX_CPU_SHARES * 100 + 1023) / 1024 ))
  else
    return 0
  fi
  # Made now (dockerd would make it at the first sandbox): it keeps what exists.
  if mkdir -p "${file%/*}" 2>/dev/null && echo "$value" >"$file" 2>/dev/null; then
    log "sandboxes' parent cgroup: ${file##*/} $value"
  else
    log "could not set $file (read-only cgroups?): sandboxes compete with the control plane"
  fi
}

# Under gVisor's ptrace platform (the default runtime) every guest task is a host
# thread: an idle sandbox holds ~40 host pids and one with a fork bomb up to its
# backstop (hotbed/limits.py, ~4,000). Without systemd as PID 1 the kernel's default
# pid_max is 32768, which 500 idle sandboxes nearly use up; systemd's own default is
# 4194304, set here the same way.
raise_pid_max() {
  local want=4194304 now; now=$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo 0)
  [ "$now" -ge "$want" ] && return 0
  if echo "$want" >/proc/sys/kernel/pid_max 2>/dev/null; then
    log "kernel.pid_max $now -> $want"
  else
    log "could not raise kernel.pid_max ($now): sandboxes on ptrace may run out of host pids"
  fi
}

need_root
raise_pid_max
install_debian_packages
install_runsc
configure_docker
start_dockerd
lower_engine_priority
lower_sandbox_cpu_weight
log "ready: $(runsc --version | head -1), docker $(docker version --format '{{.Server.Version}}'), $(redis-server --version | awk '{print $3}')"
