# mypy: ignore-errors
# (Runs inside sandboxes on the image's own python3, standard library only; kept plain.)
"""hotbed guest agent: the process hotbed runs as PID 1 of every sandbox whose image has
python3. Standard library only; the worker hands this file to ``python3`` on a pipe at
launch (``workers.guest.channel.guest_command``), so nothing is installed into the image
and it is part of every memory snapshot. Its one argument is the path of the spawner's
FIFO (``hotbed.protocol.SPAWN_FIFO``, which this file cannot import).

It talks to the worker over its own stdin/stdout (the container's attached stdio) in
frames (docs/protocol.md, "Guest agent protocol")::

    b"HBG1" | u32 header length | u32 payload length | JSON header | raw payload

One single-threaded ``selectors`` loop owns everything: child pipes are non-blocking,
output to the worker is queued and, past ``HIGH_WATER`` bytes, streaming children are
no longer read (their writes block: backpressure instead of memory). As PID 1 it reaps
every orphan. A child that closes stdout, forks daemons that keep the pipes open, floods
output, reads stdin or never exits only ever costs its own pipes and its own timeouts.
"""

import errno
import fcntl
import heapq
import json
import os
import re
import selectors
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import time

MAGIC = b"HBG1"
HEAD = struct.Struct(">4sII")
READ_CHUNK = 1 << 20
PIPE_BYTES = 1 << 20
HIGH_WATER = 4 << 20
LOW_WATER = 1 << 20
BG_BUFFER = 8 << 20
KEEP_EXITED = 256
# 2: file verbs (remove, make_dir, rename, stat, list_files depth) and pipes.
# 3: paced input (an "input" with "paced" is answered once its bytes are in stdin).
VERSION = 3
# A pipe's stderr kept for its close (the tail, where a failing command says why).
PIPE_ERR_TAIL = 64 << 10
# A pipe_read with some data answers this long after the first byte, or when full.
PIPE_GATHER_S = 0.01
# Entries one list_files answers with, at most (deeper listings of huge trees).
MAX_LIST_ENTRIES = 200_000

sel = selectors.DefaultSelector()
outq = []  # pending bytes to the worker
out_bytes = 0
timers = []  # heap of (when, seq, fn)
timer_seq = 0
procs = {}  # pid -> Proc
by_id = {}  # request id -> Proc (foreground, pty)
background = {}  # pid -> Proc (background, kept after exit)
sessions = {}  # name -> Session
watches = {}  # request id -> Watch
pipes = {}  # pid -> Pipe
paused = False


def now():
    return time.monotonic()


def send(header, payload=b""):
    global out_bytes
    h = json.dumps(header, separators=(",", ":")).encode()
    outq.append(HEAD.pack(MAGIC, len(h), len(payload)) + h)
    if payload:
        outq.append(payload if isinstance(payload, bytes) else bytes(payload))
    out_bytes += len(h) + len(payload) + HEAD.size
    flush()


def flush():
    # One writev for many frames: every syscall is expensive under gVisor.
    global out_bytes
    while outq:
        batch = outq[:64]
        try:
            n = os.writev(1, batch)
        except BlockingIOError:
            break
        except OSError:
            outq.clear()
            out_bytes = 0
            return
        out_bytes -= n
        short = n < sum(len(b) for b in batch)
        while n:
            first = outq[0]
            if n >= len(first):
                outq.pop(0)
                n -= len(first)
            else:
                outq[0] = first[n:]
                n = 0
        if short:
            break
    want = selectors.EVENT_WRITE if outq else 0
    _set_events(1, want, on_stdout_writable)
    _apply_backpressure()


def on_stdout_writable(_fd, _mask):
    flush()


_registered = {}


def _set_events(fd, events, cb):
    cur = _registered.get(fd)
    if events == 0:
        if cur is not None:
            sel.unregister(fd)
            del _registered[fd]
        return
    if cur is None:
        sel.register(fd, events, cb)
    elif cur != (events, cb):
        sel.modify(fd, events, cb)
    _registered[fd] = (events, cb)


def _apply_backpressure():
    global paused
    if not paused and out_bytes > HIGH_WATER:
        paused = True
        for p in list(procs.values()) + list(by_id.values()) + list(sessions.values()):
            p.pause(True)
    elif paused and out_bytes < LOW_WATER:
        paused = False
        for p in list(procs.values()) + list(by_id.values()) + list(sessions.values()):
            p.pause(False)


def later(delay, fn):
    global timer_seq
    timer_seq += 1
    entry = [now() + delay, timer_seq, fn]
    heapq.heappush(timers, entry)
    return entry


def cancel_timer(entry):
    if entry is not None:
        entry[2] = None


def nonblock(fd):
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)


def grow_pipe(fd):
    # Fewer, larger reads of a flooding command (every syscall costs under gVisor).
    try:
        fcntl.fcntl(fd, 1031, PIPE_BYTES)  # F_SETPIPE_SZ
    except OSError:
        pass


# A shell command made only of plain words runs what ``sh -c`` would exec, without the
# shell: under gVisor every process start costs milliseconds. Anything the shell might
# treat specially (quotes, $, globs, ~, redirections, separators, assignments, builtins,
# keywords) keeps ``/bin/sh -c``.
PLAIN_WORD = re.compile(r"[A-Za-z0-9_./@%+=:,-]+")
SH_SPECIAL = frozenset(
    "! { } [ [[ . : alias bg break case cd command continue do done echo elif else esac eval "
    "exec exit export false fc fg fi for function getopts hash if in jobs kill let local "
    "printf pwd read readonly return select set shift source test then time times trap true "
    "type typeset ulimit umask unalias unset until wait while".split()
)


_sh_is_dash = []


def plain_command(line, env, cwd):
    """``(argv, executable, env)`` to run ``line`` directly, exactly as dash would after
    ``sh -c line`` (it execs a lone simple command in place, exporting PWD), or None.
    Only where /bin/sh is dash: other shells differ in what they export."""
    if not _sh_is_dash:
        _sh_is_dash.append(os.path.basename(os.path.realpath("/bin/sh")) == "dash")
    if not _sh_is_dash[0]:
        return None
    words = line.split(" ")
    if not words or not all(PLAIN_WORD.fullmatch(w) for w in words):
        return None
    name = words[0]
    if "=" in name or name in SH_SPECIAL:
        return None
    try:
        here = os.stat(cwd or ".")
    except OSError:
        return None  # sh reports it, as before
    if "/" in name:
        exe = name
    else:
        path = env.get("PATH")
        if not path:
            return None
        exe = None
        for d in path.split(":"):
            if not d.startswith("/"):
                return None  # relative to the command's cwd: leave it to sh
            cand = os.path.join(d, name)
            if os.path.isfile(cand) and os.access(cand, os.X_OK):
                exe = cand
                break
        if exe is None:
            return None  # "not found" in sh's words
    env = dict(env)
    pwd = env.get("PWD")
    try:
        same = pwd and pwd[0] == "/" and os.path.samestat(os.stat(pwd), here)
    except OSError:
        same = False
    if not same:
        env["PWD"] = os.path.realpath(cwd or ".")
    return words, exe, env


def kill_group(pid, sig):
    for target in (-pid, pid):
        try:
            os.kill(target, sig)
        except OSError:
            pass


# ------------------------------------------------------------------ output sinks


class Stream:
    """Child output sent to the worker as ``out`` frames, up to ``limit`` bytes per stream."""

    def __init__(self, rid, limit):
        self.rid = rid
        self.limit = limit
        self.sent = [0, 0, 0]
        self.truncated = False

    def feed(self, fd_no, data):
        room = self.limit - self.sent[fd_no]
        if room <= 0:
            self.truncated = True
            return
        if len(data) > room:
            data = data[:room]
            self.truncated = True
        self.sent[fd_no] += len(data)
        send({"t": "out", "id": self.rid, "fd": fd_no}, data)


class Buffer:
    """Background process output kept here (last ``BG_BUFFER`` bytes) for any reader."""

    def __init__(self):
        self.data = [bytearray(), bytearray(), bytearray()]
        self.base = [0, 0, 0]

    def feed(self, fd_no, data):
        buf = self.data[fd_no]
        buf += data
        if len(buf) > BG_BUFFER:
            cut = len(buf) - BG_BUFFER
            del buf[:cut]
            self.base[fd_no] += cut

    def end(self, fd_no):
        return self.base[fd_no] + len(self.data[fd_no])

    def read(self, fd_no, offset, limit):
        start = max(offset, self.base[fd_no])
        i = start - self.base[fd_no]
        chunk = bytes(self.data[fd_no][i : i + limit])
        return start, chunk


# ----------------------------------------------------------------------- processes


class Proc:
    def __init__(self, rid, req, sink, background_=False, pty=None):
        self.rid = rid
        self.req = req
        self.sink = sink
        self.background = background_
        self.exit_code = None
        self.signal = None
        self.timed_out = False
        self.idle_timed_out = False
        self.started = time.time()
        self.t0 = now()
        self.waiters = []
        self.stdin_buf = bytearray()
        self.stdin_eof = False
        self.stdin_waiters = []  # paced inputs answered once stdin_buf has drained
        self.timer = None
        self.idle_timer = None
        self.fds = {}  # fd -> stream number (1 out, 2 err)
        self.stdin_fd = None
        self.pty = pty
        self.done = False
        env = dict(os.environ)
        env.update(req.get("env") or {})
        cwd = req.get("cwd") or None
        argv = req.get("argv")
        popen = None
        if not argv:
            argv = ["/bin/sh", "-c", req.get("shell") or "true"]
            direct = plain_command(req.get("shell") or "", env, cwd)
            if direct is not None:
                try:
                    popen = self._spawn(*direct, cwd, pty)
                except OSError:
                    popen = None  # not something execve runs (a script without #!): sh decides
        if popen is None:
            popen = self._spawn(argv, None, env, cwd, pty)
        self._adopt(popen, pty)
        if req.get("stdin"):
            self.write_stdin(req["stdin_data"], eof=not req.get("stdin_open"))
        timeout = req.get("timeout")
        if timeout:
            self.timer = later(timeout, self.on_timeout)
        self.idle = req.get("idle_timeout")
        if self.idle:
            self.idle_timer = later(self.idle, self.on_idle)

    def _spawn(self, argv, exe, env, cwd, pty):
        if pty is not None:
            master, slave = pty
            return subprocess.Popen(
                argv, executable=exe, stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
                env=env, start_new_session=True, close_fds=True, preexec_fn=_take_ctty,
            )
        has_stdin = self.req.get("stdin") or self.req.get("stdin_open")
        return subprocess.Popen(
            argv, executable=exe,
            stdin=subprocess.PIPE if has_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=cwd, env=env, start_new_session=True, close_fds=True,
        )

    def _adopt(self, popen, pty):
        if pty is not None:
            master, slave = pty
            os.close(slave)
            nonblock(master)
            self.fds[master] = 1
            self.stdin_fd = master
        else:
            for f, n in ((popen.stdout, 1), (popen.stderr, 2)):
                fd = os.dup(f.fileno())
                f.close()
                nonblock(fd)
                grow_pipe(fd)
                self.fds[fd] = n
            if popen.stdin is not None:
                self.stdin_fd = os.dup(popen.stdin.fileno())
                popen.stdin.close()
                nonblock(self.stdin_fd)
                grow_pipe(self.stdin_fd)
        self.pid = popen.pid
        popen.returncode = 0  # we reap it ourselves; keep Popen.__del__ quiet
        procs[self.pid] = self
        if not self.background:
            by_id[self.rid] = self
        for fd in self.fds:
            _set_events(fd, selectors.EVENT_READ, self.on_pty_event if pty else self.on_readable)

    def info(self):
        return {
            "pid": self.pid, "argv": self.req.get("argv") or ["/bin/sh", "-c", self.req.get("shell") or ""],
            "running": self.exit_code is None, "exit_code": self.exit_code,
            "signal": self.signal, "started_at": self.started,
            "stdout_size": self.sink.end(1) if isinstance(self.sink, Buffer) else 0,
            "stderr_size": self.sink.end(2) if isinstance(self.sink, Buffer) else 0,
        }

    def pause(self, on):
        if self.background or self.pty is not None:
            return
        for fd in self.fds:
            _set_events(fd, 0 if on else selectors.EVENT_READ, self.on_readable)

    def write_stdin(self, data, eof=False, waiter=None):
        if waiter is not None:
            self.stdin_waiters.append(waiter)
        if self.stdin_fd is None:
            self.answer_stdin_waiters()
            return
        self.stdin_buf += data
        self.stdin_eof = self.stdin_eof or eof
        self.on_stdin_writable(self.stdin_fd, 0)

    def answer_stdin_waiters(self):
        """Paced inputs are answered once what they brought has left stdin_buf: written,
        or dropped because the command closed its stdin or ended."""
        if self.stdin_buf and self.stdin_fd is not None:
            return
        waiters, self.stdin_waiters = self.stdin_waiters, []
        for rid in waiters:
            send({"t": "result", "id": rid, "closed": self.stdin_fd is None})

    def on_stdin_writable(self, fd, _mask):
        while self.stdin_buf:
            try:
                # A view, not a slice: a large stdin (an upload's tar) is written a pipe
                # buffer at a time, and a slice would copy a whole chunk for each.
                with memoryview(self.stdin_buf) as view:
                    n = os.write(fd, view[:READ_CHUNK])
            except BlockingIOError:
                break
            except OSError:
                self.stdin_buf.clear()
                self.stdin_eof = True
                break
            del self.stdin_buf[:n]
        if self.pty is not None:
            if self.stdin_buf:
                _set_events(fd, selectors.EVENT_READ | selectors.EVENT_WRITE, self.on_pty_event)
            else:
                _set_events(fd, selectors.EVENT_READ, self.on_pty_event)
            self.answer_stdin_waiters()
            return
        if self.stdin_buf:
            _set_events(fd, selectors.EVENT_WRITE, self.on_stdin_writable)
        else:
            _set_events(fd, 0, None)
            if self.stdin_eof:
                os.close(fd)
                self.stdin_fd = None
        self.answer_stdin_waiters()

    def on_pty_event(self, fd, mask):
        if mask & selectors.EVENT_WRITE:
            self.on_stdin_writable(fd, mask)
        if mask & selectors.EVENT_READ:
            self.on_readable(fd, mask)

    def on_readable(self, fd, _mask):
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""  # EIO: the pty's last holder went away
        if not data:
            self.close_fd(fd)
            self.maybe_finish()
            return
        self.sink.feed(self.fds[fd], data)
        if self.idle_timer is not None:
            cancel_timer(self.idle_timer)
            self.idle_timer = later(self.idle, self.on_idle)

    def close_fd(self, fd):
        if fd in self.fds:
            _set_events(fd, 0, None)
            del self.fds[fd]
            if fd != self.stdin_fd:
                os.close(fd)
            elif self.pty is not None:
                os.close(fd)
                self.stdin_fd = None

    def drain(self):
        # The child has exited: what it wrote is already in the pipes. Take that and
        # stop; anything still holding the pipes (a daemon it forked) is not waited for.
        for fd in list(self.fds):
            for _ in range(64):
                try:
                    data = os.read(fd, READ_CHUNK)
                except OSError:
                    data = b""
                if not data:
                    break
                self.sink.feed(self.fds[fd], data)
            self.close_fd(fd)
        if self.stdin_fd is not None:
            _set_events(self.stdin_fd, 0, None)
            try:
                os.close(self.stdin_fd)
            except OSError:
                pass
            self.stdin_fd = None
        self.stdin_buf.clear()
        self.answer_stdin_waiters()

    def on_exit(self, status):
        if os.WIFSIGNALED(status):
            self.signal = os.WTERMSIG(status)
            self.exit_code = 128 + self.signal
        else:
            self.exit_code = os.WEXITSTATUS(status)
        procs.pop(self.pid, None)
        self.drain()
        self.maybe_finish()

    def maybe_finish(self):
        if self.exit_code is None or self.done:
            return
        self.done = True
        cancel_timer(self.timer)
        cancel_timer(self.idle_timer)
        if self.background:
            for w in self.waiters:
                cancel_timer(w[1])
                send({"t": "result", "id": w[0], "proc": self.info()})
            self.waiters = []
            return
        by_id.pop(self.rid, None)
        send({
            "t": "exit", "id": self.rid, "code": self.exit_code, "signal": self.signal,
            "timed_out": self.timed_out, "idle_timed_out": self.idle_timed_out,
            "truncated": getattr(self.sink, "truncated", False),
            "duration": now() - self.t0,
        })

    def on_timeout(self):
        self.timer = None
        if self.exit_code is None:
            self.timed_out = True
            kill_group(self.pid, signal.SIGKILL)

    def on_idle(self):
        self.idle_timer = None
        if self.exit_code is None:
            self.idle_timed_out = True
            kill_group(self.pid, signal.SIGKILL)


def _take_ctty():
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def set_winsize(fd, rows, cols):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


# ------------------------------------------------------------------------ sessions


class Session:
    """A bash whose state persists. A command is sourced from a file, so it runs in the
    shell itself; its status comes back on a pipe of its own (fd 3), never scraped from
    output. SIGINT is trapped to ``return 130`` from the source: Ctrl-C ends the
    command, not the shell."""

    def __init__(self, name, req):
        self.name = name
        self.dir = _session_dir(name)
        status_r, status_w = os.pipe()
        env = dict(os.environ)
        env.update(req.get("env") or {})
        env.setdefault("PS1", "")
        self.popen = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=req.get("cwd") or None, env=env, start_new_session=True,
            pass_fds=(status_w,), close_fds=True,
        )
        os.close(status_w)
        self.popen.returncode = 0
        self.pid = self.popen.pid
        self.stdin = self.popen.stdin.fileno()
        self.out = {}
        for f, n in ((self.popen.stdout, 1), (self.popen.stderr, 2)):
            fd = f.fileno()
            nonblock(fd)
            self.out[fd] = n
            _set_events(fd, selectors.EVENT_READ, self.on_output)
        self.status = status_r
        self.status_buf = b""
        nonblock(status_r)
        _set_events(status_r, selectors.EVENT_READ, self.on_status)
        self.current = None  # (rid, Stream, timer, t0)
        self.queue = []
        self.seq = 0
        self.dead = False
        self.interrupted = False
        procs[self.pid] = self
        self._write(
            f"exec 3>&{status_w}; exec {status_w}>&-; "
            "trap 'return 130 2>/dev/null' INT\n".encode()
        )

    def _write(self, data):
        try:
            os.write(self.stdin, data)
        except OSError:
            pass

    def pause(self, on):
        for fd in self.out:
            _set_events(fd, 0 if on else selectors.EVENT_READ, self.on_output)

    def run(self, rid, req):
        if self.dead:
            send({"t": "error", "id": rid, "code": "SessionClosed", "message": f"session {self.name} has exited"})
            return
        self.queue.append((rid, req))
        if self.current is None:
            self._next()

    def _next(self):
        if not self.queue or self.current is not None:
            return
        rid, req = self.queue.pop(0)
        self.seq += 1
        path = os.path.join(self.dir, f"cmd{self.seq}.sh")
        with open(path, "w") as f:
            f.write(req.get("command", "") + "\n")
        redirect = " 2>&1" if req.get("merge_stderr") else ""
        timer = later(req["timeout"], lambda: self.on_timeout(rid)) if req.get("timeout") else None
        self.current = [rid, Stream(rid, req.get("max_output") or (1 << 20)), timer, now(), path, False]
        self.interrupted = False
        self._write(f". {path} </dev/null{redirect}; printf '%d\\n' $? >&3\n".encode())

    def on_output(self, fd, _mask):
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            _set_events(fd, 0, None)
            self.out.pop(fd, None)
            return
        if self.current is not None:
            self.current[1].feed(self.out[fd], data)

    def on_status(self, fd, _mask):
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            # The shell lost its status pipe (a command closed fd 3, or it is exiting):
            # without it no command can finish, so end the session (reported on exit).
            _set_events(fd, 0, None)
            if not self.dead:
                kill_group(self.pid, signal.SIGKILL)
            return
        self.status_buf += data
        while b"\n" in self.status_buf:
            line, self.status_buf = self.status_buf.split(b"\n", 1)
            self._finish(int(line or b"0"))

    def _drain(self):
        for fd in list(self.out):
            for _ in range(64):
                try:
                    data = os.read(fd, READ_CHUNK)
                except OSError:
                    break
                if not data:
                    break
                if self.current is not None:
                    self.current[1].feed(self.out[fd], data)

    def _finish(self, code, ended=False):
        self._drain()
        cur, self.current = self.current, None
        if cur is None:
            return
        rid, stream, timer, t0, path, timed_out = cur
        cancel_timer(timer)
        try:
            os.unlink(path)
        except OSError:
            pass
        send({
            "t": "exit", "id": rid, "code": code, "timed_out": timed_out,
            "interrupted": self.interrupted and not timed_out, "truncated": stream.truncated,
            "duration": now() - t0, "session_ended": ended,
        })
        self._next()

    def interrupt(self):
        if self.current is not None:
            self.interrupted = True
            kill_group(self.pid, signal.SIGINT)
            rid = self.current[0]
            later(2.0, lambda: self._force(rid))

    def _force(self, rid):
        # SIGINT did not end it (a child that ignores it): kill the session's other
        # foreground processes; the shell survives.
        if self.current is None or self.current[0] != rid:
            return
        for pid in _group_members(self.pid):
            if pid != self.pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def on_timeout(self, rid):
        if self.current is not None and self.current[0] == rid:
            self.current[5] = True
            self.interrupt()

    def on_exit(self, status):
        self.dead = True
        procs.pop(self.pid, None)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
        self._finish(code, ended=True)
        for rid, _req in self.queue:
            send({"t": "error", "id": rid, "code": "SessionClosed", "message": f"session {self.name} has exited"})
        self.queue = []
        self.close()

    def close(self):
        # Called twice for a closed session: by the close request, then by on_exit when
        # the killed shell is reaped. A second os.close of the status fd would close
        # whatever fd took its number since (another command's pipe).
        if self.status is None:
            return
        self.dead = True
        for fd in list(self.out) + [self.status]:
            _set_events(fd, 0, None)
        for f in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            try:
                f.close()
            except OSError:
                pass
        try:
            os.close(self.status)
        except OSError:
            pass
        self.status = None
        self.out = {}
        if procs.get(self.pid) is self:
            kill_group(self.pid, signal.SIGKILL)
        if sessions.get(self.name) is self:
            del sessions[self.name]
        for name in os.listdir(self.dir):
            try:
                os.unlink(os.path.join(self.dir, name))
            except OSError:
                pass
        try:
            os.rmdir(self.dir)
        except OSError:
            pass


_session_seq = [0]


def _session_dir(name):
    base = os.environ.get("TMPDIR") or "/tmp"
    while True:
        _session_seq[0] += 1
        path = os.path.join(base, f".hotbed-session-{os.getpid()}-{_session_seq[0]}")
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue


def _group_members(pgid):
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if int(fields[2]) == pgid:
                out.append(int(name))
        except (OSError, IndexError, ValueError):
            pass
    return out


# --------------------------------------------------------------------------- watch


class Watch:
    """Polls a directory tree (inotify is not in the standard library) for changes."""

    def __init__(self, rid, path, interval):
        self.rid = rid
        self.path = path
        self.interval = max(0.05, interval)
        self.state = self.scan()
        self.timer = later(self.interval, self.tick)

    def scan(self):
        state = {}
        stack = [self.path]
        while stack and len(state) < 20000:
            d = stack.pop()
            try:
                with os.scandir(d) as it:
                    for e in it:
                        try:
                            st = e.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        state[e.path] = (st.st_mtime_ns, st.st_size, e.is_dir(follow_symlinks=False))
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
            except OSError:
                continue
        return state

    def tick(self):
        new = self.scan()
        events = []
        for p, v in new.items():
            old = self.state.get(p)
            if old is None:
                events.append(["created", p, v[2]])
            elif old != v and not v[2]:
                events.append(["modified", p, v[2]])
        for p, v in self.state.items():
            if p not in new:
                events.append(["deleted", p, v[2]])
        self.state = new
        if events:
            send({"t": "event", "id": self.rid, "events": events})
        self.timer = later(self.interval, self.tick)

    def stop(self):
        cancel_timer(self.timer)


# --------------------------------------------------------------------------- pipes


class Pipe:
    """A command whose stdin and stdout move only when the worker asks: ``pipe_write``
    is answered once its bytes are in the command's stdin, ``pipe_read`` with what the
    command has written. A transfer of any size thus holds at most one request's bytes
    here, and goes at the pace of whoever pushes or pulls. Its stderr's tail is kept for
    ``pipe_close``. Killed after ``idle_timeout`` without a request, or ``timeout``."""

    def __init__(self, h):
        env = dict(os.environ)
        env.update(h.get("env") or {})
        popen = subprocess.Popen(
            h["argv"],
            stdin=subprocess.PIPE if h.get("write") else subprocess.DEVNULL,
            stdout=subprocess.PIPE if h.get("read") else subprocess.DEVNULL,
            stderr=subprocess.PIPE, cwd=h.get("cwd") or None, env=env,
            start_new_session=True, close_fds=True,
        )
        popen.returncode = 0  # reaped by reap(), like every child
        self.pid = popen.pid
        self.stdin_fd = self._take(popen.stdin)
        self.stdout_fd = self._take(popen.stdout)
        self.stderr_fd = self._take(popen.stderr)
        self.err = bytearray()
        self.exit_code = None
        self.signal = None
        self.out_eof = self.stdout_fd is None
        self.in_buf = bytearray()
        self.eof_after_write = False
        self.writer = None  # request id of the write in progress
        self.reader = None  # [request id, max bytes, data, gather timer]
        self.ahead = bytearray()  # read ahead of the next pipe_read
        self.ahead_max = 0
        self.closer = None  # [request id, kill timer]
        self.idle = h.get("idle_timeout") or 120.0
        self.idle_timer = later(self.idle, self.expire)
        self.deadline = later(h.get("timeout") or 3600.0, self.expire)
        _set_events(self.stderr_fd, selectors.EVENT_READ, self.on_stderr)
        procs[self.pid] = self
        pipes[self.pid] = self

    @staticmethod
    def _take(f):
        if f is None:
            return None
        fd = os.dup(f.fileno())
        f.close()
        nonblock(fd)
        grow_pipe(fd)
        return fd

    def pause(self, _on):
        pass  # moved only on request: the worker's pace is the backpressure

    def touch(self):
        cancel_timer(self.idle_timer)
        self.idle_timer = later(self.idle, self.expire)

    def _close_fd(self, name):
        fd = getattr(self, name)
        if fd is not None:
            _set_events(fd, 0, None)
            try:
                os.close(fd)
            except OSError:
                pass
            setattr(self, name, None)

    def on_stderr(self, fd, _mask):
        try:
            data = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_fd("stderr_fd")
            return
        self.err += data
        if len(self.err) > PIPE_ERR_TAIL:
            del self.err[: len(self.err) - PIPE_ERR_TAIL]

    def _fail(self, rid, message):
        send({"t": "error", "id": rid, "code": "FileError",
              "message": message + (": " + self.err.decode("utf-8", "replace").strip() if self.err else "")})

    # ---- stdin

    def write(self, rid, data, eof):
        if self.writer is not None:
            raise ValueError(f"pipe {self.pid}: a write is in progress")
        if self.stdin_fd is None:
            self._fail(rid, f"pipe {self.pid}: its input is closed")
            return
        self.in_buf += data
        self.eof_after_write = bool(eof)
        self.writer = rid
        self.on_writable(self.stdin_fd, 0)

    def on_writable(self, fd, _mask):
        while self.in_buf:
            try:
                n = os.write(fd, self.in_buf[:READ_CHUNK])
            except BlockingIOError:
                break
            except OSError:
                # EPIPE: the command stopped reading (it failed, or exited early).
                self.in_buf.clear()
                self._close_fd("stdin_fd")
                rid, self.writer = self.writer, None
                if rid is not None:
                    self._fail(rid, "the command stopped reading its input")
                return
            del self.in_buf[:n]
        if self.in_buf:
            _set_events(fd, selectors.EVENT_WRITE, self.on_writable)
            return
        _set_events(fd, 0, None)
        if self.eof_after_write:
            self._close_fd("stdin_fd")
        rid, self.writer = self.writer, None
        if rid is not None:
            self.touch()
            send({"t": "result", "id": rid})

    # ---- stdout
    # Between reads, up to the last read's size is read ahead, so the command keeps
    # producing while a chunk travels: still one chunk held here, at most.

    def read(self, rid, max_bytes):
        if self.reader is not None:
            raise ValueError(f"pipe {self.pid}: a read is in progress")
        self.reader = [rid, max(1, max_bytes), bytearray(), None]
        self.ahead_max = self.reader[1]
        if self.ahead:
            self.reader[2] += self.ahead[: self.reader[1]]
            del self.ahead[: self.reader[1]]
        if self.stdout_fd is None:
            self.answer_read()
        else:
            self.on_readable(self.stdout_fd, 0)

    def on_readable(self, fd, _mask):
        r = self.reader
        buf, want = (r[2], r[1]) if r is not None else (self.ahead, self.ahead_max)
        while len(buf) < want:
            try:
                data = os.read(fd, min(READ_CHUNK, want - len(buf)))
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self.out_eof = True
                self._close_fd("stdout_fd")
                break
            buf += data
        if r is None:
            if self.stdout_fd is not None:
                _set_events(fd, selectors.EVENT_READ if len(buf) < want else 0, self.on_readable)
            return
        if self.out_eof or len(buf) >= want:
            self.answer_read()
            return
        _set_events(fd, selectors.EVENT_READ, self.on_readable)
        if buf and r[3] is None:
            r[3] = later(PIPE_GATHER_S, self.answer_read)

    def answer_read(self):
        r, self.reader = self.reader, None
        if r is None:
            return
        cancel_timer(r[3])
        self.touch()
        eof = self.out_eof and not self.ahead
        send({"t": "result", "id": r[0], "eof": eof}, bytes(r[2]))
        if self.stdout_fd is not None:
            self.on_readable(self.stdout_fd, 0)

    # ---- end

    def on_exit(self, status):
        if os.WIFSIGNALED(status):
            self.signal = os.WTERMSIG(status)
            self.exit_code = 128 + self.signal
        else:
            self.exit_code = os.WEXITSTATUS(status)
        procs.pop(self.pid, None)
        # What it wrote to stderr is in the pipe already (a daemon it left holding the
        # pipe is not waited for).
        for _ in range(64):
            if self.stderr_fd is None:
                break
            before = len(self.err)
            self.on_stderr(self.stderr_fd, 0)
            if len(self.err) == before:
                break
        if self.closer is not None:
            self.finish()

    def close(self, rid, kill, timeout):
        if self.closer is not None:
            raise ValueError(f"pipe {self.pid}: already closing")
        if kill and self.exit_code is None:
            kill_group(self.pid, signal.SIGKILL)
        for pending in (self.writer, self.reader[0] if self.reader else None):
            if pending is not None:
                self._fail(pending, f"pipe {self.pid} closed")
        self.writer = self.reader = None
        # Closing its stdout ends a command whose output nobody wants (SIGPIPE).
        self._close_fd("stdin_fd")
        self._close_fd("stdout_fd")
        self.closer = [rid, None]
        if self.exit_code is not None:
            self.finish()
        else:
            self.closer[1] = later(timeout or 600.0, lambda: kill_group(self.pid, signal.SIGKILL))

    def finish(self):
        rid, timer = self.closer
        cancel_timer(timer)
        self.drop()
        send({"t": "result", "id": rid, "code": self.exit_code, "signal": self.signal},
             bytes(self.err))

    def expire(self):
        if pipes.get(self.pid) is not self:
            return
        if self.exit_code is None:
            kill_group(self.pid, signal.SIGKILL)
        for pending in (self.writer, self.reader[0] if self.reader else None):
            if pending is not None:
                self._fail(pending, f"pipe {self.pid} expired")
        self.writer = self.reader = None
        if self.closer is not None:
            self.closer[1] = None  # answered by on_exit once it is killed
            return
        self.drop()

    def drop(self):
        cancel_timer(self.idle_timer)
        cancel_timer(self.deadline)
        for name in ("stdin_fd", "stdout_fd", "stderr_fd"):
            self._close_fd(name)
        pipes.pop(self.pid, None)


# ----------------------------------------------------------------------- requests
#
# One handler per request type, ``fn(rid, header, payload)``; each answers with its own
# frames. ``handle`` turns what a handler raises into an ``error`` frame.


def req_run(rid, h, payload):
    h["stdin_data"] = payload
    try:
        Proc(rid, h, Stream(rid, h.get("max_output") or (1 << 20)))
    except OSError as exc:
        # As a shell would: 127 not found, 126 not executable.
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        what = exc.filename or (h.get("argv") or ["sh"])[0]
        send({"t": "out", "id": rid, "fd": 2}, f"{what}: {exc.strerror}\n".encode())
        send({"t": "exit", "id": rid, "code": code, "duration": 0.0})


def req_start(rid, h, payload):
    h["stdin_data"] = payload
    p = Proc(rid, h, Buffer(), background_=True)
    background[p.pid] = p
    _trim_background()
    send({"t": "result", "id": rid, "proc": p.info()})


def req_pty(rid, h, payload):
    h["stdin_data"] = payload
    master, slave = os.openpty()
    set_winsize(master, h.get("rows") or 24, h.get("cols") or 80)
    Proc(rid, h, Stream(rid, 1 << 62), pty=(master, slave))


def req_input(rid, h, payload):
    p = by_id.get(h.get("target")) or background.get(h.get("pid"))
    if p is not None and rid and h.get("paced"):
        p.write_stdin(payload, eof=bool(h.get("eof")), waiter=rid)
        return
    if p is not None:
        p.write_stdin(payload, eof=bool(h.get("eof")))
    if rid:
        send({"t": "result", "id": rid, "closed": p is None})


def req_resize(rid, h, _payload):
    p = by_id.get(h.get("target"))
    if p is not None and p.pty is not None and p.stdin_fd is not None:
        set_winsize(p.stdin_fd, h["rows"], h["cols"])
        kill_group(p.pid, signal.SIGWINCH)
    send({"t": "result", "id": rid})


def req_cancel(rid, h, _payload):
    target = h.get("target")
    p = by_id.get(target)
    if p is not None and p.exit_code is None:
        kill_group(p.pid, signal.SIGKILL)
    w = watches.pop(target, None)
    if w is not None:
        w.stop()
        send({"t": "exit", "id": target, "code": 0})
    send({"t": "result", "id": rid})


def req_signal(rid, h, _payload):
    p = background.get(h["pid"]) or procs.get(h["pid"])
    if p is None:
        raise LookupError(f"no process {h['pid']}")
    # ``procs`` also holds session shells: a Session has no exit code and is alive while listed.
    if p.exit_code is None if isinstance(p, Proc) else True:
        if h.get("group", True):
            kill_group(p.pid, h.get("signal", 15))
        else:
            os.kill(p.pid, h.get("signal", 15))
    send({"t": "result", "id": rid, "proc": p.info() if isinstance(p, Proc) else None})


def req_list(rid, _h, _payload):
    send({"t": "result", "id": rid, "procs": [p.info() for p in background.values()]})


def _background_proc(h):
    p = background.get(h["pid"])
    if p is None:
        raise LookupError(f"no process {h['pid']}")
    return p


def req_read(rid, h, _payload):
    p = _background_proc(h)
    limit = h.get("max_bytes") or (1 << 20)
    o_start, o = p.sink.read(1, h.get("stdout_offset", 0), limit)
    e_start, e = p.sink.read(2, h.get("stderr_offset", 0), limit)
    send({"t": "result", "id": rid, "proc": p.info(), "stdout_offset": o_start,
          "stderr_offset": e_start, "stdout_len": len(o)}, o + e)


def req_wait(rid, h, _payload):
    p = _background_proc(h)
    if p.exit_code is not None:
        send({"t": "result", "id": rid, "proc": p.info()})
        return
    # Answered by Proc.maybe_finish when it exits, or here when the timeout comes first.
    entry = [rid, None]
    if h.get("timeout"):
        def expire(entry=entry, p=p):
            if entry in p.waiters:
                p.waiters.remove(entry)
                send({"t": "result", "id": entry[0], "proc": p.info()})
        entry[1] = later(h["timeout"], expire)
    p.waiters.append(entry)


def req_session_run(rid, h, _payload):
    name = h["session"]
    s = sessions.get(name)
    if s is None or s.dead:
        s = sessions[name] = Session(name, h)
    s.run(rid, h)


def req_session_open(rid, h, _payload):
    name = h["session"]
    if name not in sessions or sessions[name].dead:
        sessions[name] = Session(name, h)
    send({"t": "result", "id": rid, "pid": sessions[name].pid})


def req_session_interrupt(rid, h, _payload):
    s = sessions.get(h["session"])
    if s is not None:
        s.interrupt()
    send({"t": "result", "id": rid, "running": bool(s and s.current)})


def req_session_close(rid, h, _payload):
    s = sessions.pop(h["session"], None)
    if s is not None:
        s.close()
    send({"t": "result", "id": rid, "existed": s is not None})


def req_sessions(rid, _h, _payload):
    send({"t": "result", "id": rid, "sessions": [
        {"name": s.name, "pid": s.pid, "busy": s.current is not None} for s in sessions.values()
    ]})


def req_read_file(rid, h, _payload):
    with open(h["path"], "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(h.get("offset", 0))
        data = f.read(h.get("length") or (1 << 20))
    send({"t": "result", "id": rid, "size": size}, data)


def req_write_file(rid, h, payload):
    path = h["path"]
    if h.get("make_dirs", True):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT
    if h.get("append"):
        flags |= os.O_APPEND
    else:
        flags |= os.O_TRUNC
    fd = os.open(path, flags, h.get("mode", 0o644))
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        # O_CREAT's mode is masked by the umask and ignored for an existing file.
        if not h.get("append"):
            os.fchmod(fd, h.get("mode", 0o644))
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    send({"t": "result", "id": rid, "size": size})


def _stat_row(rel, st, is_link=None):
    """One entry as the worker decodes it: relative path, size, mode, mtime, is a link."""
    link = stat.S_ISLNK(st.st_mode) if is_link is None else is_link
    return [rel, st.st_size, st.st_mode, st.st_mtime, link]


def req_list_files(rid, h, _payload):
    # depth 1: the directory's own entries; each level more, their subdirectories' too
    # (named by their path relative to ``path``). Symlinked directories are not entered.
    depth = max(1, int(h.get("depth") or 1))
    entries = []
    stack = [("", 1)]
    truncated = False
    while stack:
        rel_dir, level = stack.pop()
        try:
            it = os.scandir(os.path.join(h["path"], rel_dir) if rel_dir else h["path"])
        except OSError:
            if not rel_dir:
                raise
            continue
        with it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
                entries.append(_stat_row(rel, st))
                if level < depth and stat.S_ISDIR(st.st_mode):
                    stack.append((rel, level + 1))
        if len(entries) >= MAX_LIST_ENTRIES:
            truncated = True
            break
    send({"t": "result", "id": rid, "entries": entries, "truncated": truncated})


def req_stat(rid, h, _payload):
    path = h["path"]
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        if not h.get("missing_ok"):
            raise
        send({"t": "result", "id": rid, "entry": None})
        return
    st = lst
    if stat.S_ISLNK(lst.st_mode):
        try:
            st = os.stat(path)  # what the link points to; a dangling link stays a link
        except OSError:
            pass
    send({"t": "result", "id": rid,
          "entry": _stat_row(os.path.basename(path.rstrip("/")) or "/", st, stat.S_ISLNK(lst.st_mode))})


def req_remove(rid, h, _payload):
    path = h["path"]
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
    elif h.get("recursive"):
        shutil.rmtree(path)
    else:
        os.rmdir(path)
    send({"t": "result", "id": rid})


def req_make_dir(rid, h, _payload):
    path = h["path"]
    mode = h.get("mode", 0o755)
    created = True
    try:
        if h.get("parents", True):
            os.makedirs(path, mode)
        else:
            os.mkdir(path, mode)
    except FileExistsError:
        if not h.get("exist_ok", True) or not os.path.isdir(path):
            raise
        created = False
    send({"t": "result", "id": rid, "created": created})


def req_rename(rid, h, _payload):
    src, dst = h["src"], h["dst"]
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # Across filesystems (/tmp on its own mount): copy, then remove the source.
        if os.path.isdir(dst) and not os.path.islink(dst):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", dst) from None
        shutil.move(src, dst)
    send({"t": "result", "id": rid})


def _pipe(h):
    p = pipes.get(h.get("pipe"))
    if p is None:
        raise LookupError(f"no pipe {h.get('pipe')}")
    return p


def req_pipe_open(rid, h, _payload):
    p = Pipe(h)
    send({"t": "result", "id": rid, "pid": p.pid})


def req_pipe_write(rid, h, payload):
    _pipe(h).write(rid, payload, h.get("eof"))


def req_pipe_read(rid, h, _payload):
    _pipe(h).read(rid, int(h.get("max_bytes") or (8 << 20)))


def req_pipe_close(rid, h, _payload):
    _pipe(h).close(rid, bool(h.get("kill")), h.get("timeout"))


def req_watch(rid, h, _payload):
    watches[rid] = Watch(rid, h["path"], h.get("interval") or 0.2)
    send({"t": "result", "id": rid})


def req_hello(rid, _h, _payload):
    send({"t": "result", "id": rid, "version": VERSION, "pid": os.getpid(), "uid": os.getuid()})


# ------------------------------------------------------------------------ tunnels
#
# A tunnel relays one TCP connection the worker accepted on an exposed port to
# 127.0.0.1:PORT in here. Both directions are flow-controlled by credit, so neither
# side buffers more than a window: we send ``out`` frames only while fewer than
# TUNNEL_FRAMES of them (and TUNNEL_WINDOW bytes) are unacknowledged by the worker's
# ``tunnel_ack``; we acknowledge each ``tunnel_data`` frame (``ack``) once it is written
# to the socket, and the worker sends no more than the same window ahead of that.
# ``eof`` says the server half-closed; ``exit`` ends the tunnel.

TUNNEL_CHUNK = 256 << 10
TUNNEL_WINDOW = 1 << 20
TUNNEL_FRAMES = 8
tunnels = {}  # request id -> Tunnel


class Tunnel:
    def __init__(self, rid, port):
        self.rid = rid
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.connected = False
        self.pending = []  # [bytearray, frame size] from the worker, to the socket
        self.eof_in = False  # the worker's client half-closed
        self.shut_wr = False
        self.eof_out = False  # the server half-closed
        self.unacked = 0
        self.unacked_frames = 0
        self.done = False
        err = self.sock.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
            self.sock.close()
            raise ConnectionRefusedError(err, os.strerror(err))
        tunnels[rid] = self
        self.update()

    def update(self):
        if self.done:
            return
        events = 0
        if not self.connected:
            events = selectors.EVENT_WRITE
        else:
            if not self.eof_out and self.unacked < TUNNEL_WINDOW and self.unacked_frames < TUNNEL_FRAMES:
                events |= selectors.EVENT_READ
            if self.pending:
                events |= selectors.EVENT_WRITE
        _set_events(self.fd, events, self.on_event)

    def on_event(self, _fd, mask):
        if not self.connected:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(f"cannot connect to 127.0.0.1:{self.port} in the sandbox: {os.strerror(err)}")
                return
            self.connected = True
            send({"t": "result", "id": self.rid})
            mask = 0
        if mask & selectors.EVENT_READ:
            self.on_readable()
        if not self.done and mask & selectors.EVENT_WRITE:
            self.on_writable()
        self.update()

    def on_readable(self):
        try:
            data = self.sock.recv(TUNNEL_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(f"connection to port {self.port} broke: {exc.strerror or exc}")
            return
        if not data:
            self.eof_out = True
            send({"t": "eof", "id": self.rid})
            self.maybe_finish()
            return
        self.unacked += len(data)
        self.unacked_frames += 1
        send({"t": "out", "id": self.rid, "fd": 1}, data)

    def on_writable(self):
        while self.pending:
            buf, size = self.pending[0]
            try:
                n = self.sock.send(buf)
            except BlockingIOError:
                return
            except OSError as exc:
                self.fail(f"connection to port {self.port} broke: {exc.strerror or exc}")
                return
            del buf[:n]
            if buf:
                return
            self.pending.pop(0)
            send({"t": "ack", "id": self.rid, "n": size})
        self.maybe_shutdown()

    def feed(self, data, eof):
        if data:
            self.pending.append([bytearray(data), len(data)])
        self.eof_in = self.eof_in or eof
        if self.connected:
            self.on_writable()
        self.update()

    def maybe_shutdown(self):
        if self.eof_in and not self.pending and not self.shut_wr and self.connected:
            self.shut_wr = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.maybe_finish()

    def maybe_finish(self):
        if self.eof_out and self.shut_wr:
            self.close()
            send({"t": "exit", "id": self.rid, "code": 0})

    def fail(self, message):
        self.close()
        send({"t": "error", "id": self.rid, "code": "SandboxNotRunning", "message": message})

    def close(self):
        if self.done:
            return
        self.done = True
        tunnels.pop(self.rid, None)
        _set_events(self.fd, 0, None)
        self.sock.close()


def req_tunnel(rid, h, _payload):
    port = h.get("port")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"bad port {port!r}")
    try:
        Tunnel(rid, port)
    except OSError as exc:
        send({"t": "error", "id": rid, "code": "SandboxNotRunning",
              "message": f"cannot connect to 127.0.0.1:{port} in the sandbox: {exc.strerror or exc}"})


def req_tunnel_data(_rid, h, payload):
    t = tunnels.get(h.get("target"))
    if t is not None:
        t.feed(payload, bool(h.get("eof")))


def req_tunnel_ack(_rid, h, _payload):
    t = tunnels.get(h.get("target"))
    if t is not None:
        t.unacked = max(0, t.unacked - int(h.get("n") or 0))
        t.unacked_frames = max(0, t.unacked_frames - 1)
        t.update()


def req_tunnel_close(_rid, h, _payload):
    t = tunnels.get(h.get("target"))
    if t is not None:
        t.close()


HANDLERS = {
    "run": req_run,
    "start": req_start,
    "pty": req_pty,
    "input": req_input,
    "resize": req_resize,
    "cancel": req_cancel,
    "signal": req_signal,
    "list": req_list,
    "read": req_read,
    "wait": req_wait,
    "session_run": req_session_run,
    "session_open": req_session_open,
    "session_interrupt": req_session_interrupt,
    "session_close": req_session_close,
    "sessions": req_sessions,
    "read_file": req_read_file,
    "write_file": req_write_file,
    "list_files": req_list_files,
    "stat": req_stat,
    "remove": req_remove,
    "make_dir": req_make_dir,
    "rename": req_rename,
    "watch": req_watch,
    "pipe_open": req_pipe_open,
    "pipe_write": req_pipe_write,
    "pipe_read": req_pipe_read,
    "pipe_close": req_pipe_close,
    "hello": req_hello,
    "tunnel": req_tunnel,
    "tunnel_data": req_tunnel_data,
    "tunnel_ack": req_tunnel_ack,
    "tunnel_close": req_tunnel_close,
}
# Any OSError of these is about a path (a FileError); on the others, about a command.
FILE_REQUESTS = (
    "read_file", "write_file", "list_files", "watch", "stat", "remove", "make_dir", "rename",
)
# The typed errors (hotbed.errors) of the OSErrors that name what is wrong with a path.
OS_ERROR_CODES = (
    (FileNotFoundError, "FileNotFound"),
    (FileExistsError, "FileExists"),
    (IsADirectoryError, "IsADirectory"),
    (NotADirectoryError, "NotADirectory"),
)


def _os_message(exc):
    return f"{(exc.strerror or str(exc)).lower()}: {exc.filename}"


def _os_error(t, exc):
    """The error code and message of an OSError a request ``t`` raised."""
    if t in FILE_REQUESTS or isinstance(exc, (FileNotFoundError, IsADirectoryError)):
        for cls, code in OS_ERROR_CODES:
            if isinstance(exc, cls):
                return code, _os_message(exc)
        return ("DirectoryNotEmpty" if exc.errno == errno.ENOTEMPTY else "FileError"), _os_message(exc)
    if isinstance(exc, PermissionError):
        return "ExecFailed", _os_message(exc)
    return "ExecFailed", f"{type(exc).__name__}: {exc}"


def handle(h, payload):
    t = h.get("t")
    rid = h.get("id", 0)
    # A JSON header may carry any value as ``t``; only strings name a request.
    fn = HANDLERS.get(t) if isinstance(t, str) else None
    try:
        if fn is None:
            raise ValueError(f"unknown request {t!r}")
        fn(rid, h, payload)
    except OSError as exc:
        code, message = _os_error(t, exc)
        send({"t": "error", "id": rid, "code": code, "message": message})
    except LookupError as exc:
        send({"t": "error", "id": rid, "code": "ProcessNotFound", "message": str(exc)})
    except Exception as exc:  # one bad request never ends the agent
        send({"t": "error", "id": rid, "code": "ExecFailed", "message": f"{type(exc).__name__}: {exc}"})
    finally:
        forget_env(h)


def forget_env(h):
    """Drop the env a request carried once its command started with it. The sandbox's
    own env (API keys) comes with each command, never at launch: this process is in
    every memory snapshot of the sandbox, so it keeps no copy and overwrites the strings
    it decoded (a freed string's bytes stay in the heap until reused)."""
    env = h.pop("env", None) if isinstance(h, dict) else None
    if isinstance(env, dict):
        for v in env.values():
            wipe(v)
        env.clear()


_ctypes = []  # [module] once imported; [None] where the interpreter has none


def wipe(data):
    """Overwrite ``data``'s bytes in place: a bytearray always; a bytes or an ASCII str
    through ctypes where CPython has it (their data sits at the end of the object)."""
    if isinstance(data, bytearray):
        data[:] = bytes(len(data))
        return
    # Length 0 and 1 strings are shared singletons: never touch those.
    if type(data) not in (str, bytes) or len(data) < 2 or (type(data) is str and not data.isascii()):
        return
    if not _ctypes:
        try:
            import ctypes
            _ctypes.append(ctypes if sys.implementation.name == "cpython" else None)
        except ImportError:
            _ctypes.append(None)
    ctypes = _ctypes[0]
    if ctypes is not None:
        ctypes.memset(id(data) + sys.getsizeof(data) - len(data) - 1, 0, len(data))


def _trim_background():
    done = [p for p in background.values() if p.exit_code is not None]
    for p in done[: max(0, len(done) - KEEP_EXITED)]:
        background.pop(p.pid, None)


# ----------------------------------------------------------------------- main loop


inbuf = bytearray()


def on_stdin(fd, _mask):
    try:
        data = os.read(fd, 1 << 20)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    if not data:
        # The worker's side closed; the container lives on and a new attach resumes.
        _set_events(fd, 0, None)
        later(0.5, lambda: _set_events(0, selectors.EVENT_READ, on_stdin))
        return
    inbuf.extend(data)
    if b'"env":{"' in data:
        wipe(data)  # a command's env: see forget_env
    while True:
        i = inbuf.find(MAGIC)
        if i < 0:
            del inbuf[: max(0, len(inbuf) - 3)]
            return
        if i:
            del inbuf[:i]
        if len(inbuf) < HEAD.size:
            return
        _m, hl, pl = HEAD.unpack_from(inbuf)
        total = HEAD.size + hl + pl
        if len(inbuf) < total:
            return
        raw = inbuf[HEAD.size : HEAD.size + hl]
        try:
            text = raw.decode("utf-8", "surrogatepass")
            header = json.loads(text)
        except ValueError:
            del inbuf[:4]
            continue
        payload = bytes(inbuf[HEAD.size + hl : total])
        if isinstance(header, dict) and header.get("env"):
            # A command's env (the sandbox's API keys): no copy of the frame stays behind.
            wipe(raw)
            wipe(text)
            inbuf[HEAD.size : HEAD.size + hl] = bytes(hl)
        del inbuf[:total]
        handle(header, payload)


spawn_buf = bytearray()


def open_spawner(fifo):
    """Each line written to the FIFO at ``fifo`` (the worker passes its path at launch)
    starts as a child of init (the same contract as the runtime's idle shell): such
    processes are part of a memory snapshot. Their output goes to ``spawn.log`` beside it."""
    if not fifo:
        sys.stderr.write("hotbed guest agent: no spawner: no FIFO path given\n")
        return
    spawn_dir = os.path.dirname(fifo) or "."
    try:
        os.makedirs(spawn_dir, exist_ok=True)
        try:
            os.mkfifo(fifo, 0o600)
        except FileExistsError:
            pass
        fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    except OSError as exc:
        sys.stderr.write(f"hotbed guest agent: no spawner: {exc}\n")
        return
    log_path = os.path.join(spawn_dir, "spawn.log")
    _set_events(fd, selectors.EVENT_READ, lambda fd_, mask: on_spawn(fd_, mask, log_path))


def on_spawn(fd, _mask, log_path):
    try:
        data = os.read(fd, 65536)
    except OSError:
        return
    spawn_buf.extend(data)
    while b"\n" in spawn_buf:
        line, _, rest = bytes(spawn_buf).partition(b"\n")
        spawn_buf[:] = rest
        if not line.strip():
            continue
        try:
            with open(log_path, "ab") as log:
                p = subprocess.Popen(
                    ["/bin/sh", "-c", line.decode()], stdin=subprocess.DEVNULL,
                    stdout=log, stderr=log, start_new_session=True, close_fds=True,
                )
            p.returncode = 0
        except OSError as exc:
            sys.stderr.write(f"hotbed guest agent: spawn failed: {exc}\n")


def reap():
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        p = procs.get(pid)
        if p is not None:
            p.on_exit(status)


def undumpable():
    """PR_SET_DUMPABLE 0: where the kernel honours it (runc, process runtimes) the
    sandbox's code, which runs as our uid, can no longer open /proc/1/fd and write
    frames into our stdout. gVisor ignores it for /proc/[pid]/fd; there the worker's
    frame limits are what hold."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)
    except (ImportError, OSError, AttributeError):
        pass


def main(args):
    """``args``: what the worker passed at launch: the spawner's FIFO."""
    undumpable()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    wake_r, wake_w = os.pipe()
    nonblock(wake_r)
    nonblock(wake_w)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)

    def on_wake(fd, _mask):
        try:
            os.read(fd, 4096)
        except OSError:
            pass
        reap()

    _set_events(wake_r, selectors.EVENT_READ, on_wake)
    nonblock(0)
    nonblock(1)
    open_spawner(args[0] if args else None)
    _set_events(0, selectors.EVENT_READ, on_stdin)
    send({"t": "ready", "id": 0, "version": VERSION, "pid": os.getpid(), "uid": os.getuid()})
    while True:
        timeout = None
        while timers:
            if timers[0][2] is None:
                heapq.heappop(timers)
                continue
            timeout = max(0.0, timers[0][0] - now())
            break
        try:
            events = sel.select(timeout)
        except InterruptedError:
            events = []
        for key, mask in events:
            if key.fd in _registered:
                guarded(key.data, key.fd, mask)
        t = now()
        while timers and (timers[0][2] is None or timers[0][0] <= t):
            entry = heapq.heappop(timers)
            if entry[2] is not None:
                fn, entry[2] = entry[2], None
                guarded(fn)
        guarded(reap)


def guarded(fn, *args):
    # PID 1 must not die of one bad event: its sandbox would die with it.
    try:
        fn(*args)
    except Exception as exc:
        sys.stderr.write(f"hotbed guest agent: {type(exc).__name__}: {exc}\n")


if __name__ == "__main__":
    try:
        # As the worker launches it (see workers.guest.channel.guest_command), or as a
        # plain script: either way the arguments follow the program's name.
        main(sys.argv[1:])
    except SystemExit:
        raise
    except BaseException as exc:  # leave a trace for `docker logs`, then end
        sys.stderr.write(f"hotbed guest agent failed: {type(exc).__name__}: {exc}\n")
        raise
