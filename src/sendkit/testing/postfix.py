"""A private, loopback-only Postfix for integration tests and benchmarks.

:class:`PostfixInstance` configures and starts a Postfix instance of its own, so tests meet a
real MTA without touching the machine's default instance (which may not even be configured:
``.ci/install-postfix.sh`` installs the package with "No configuration")::

    async with SmtpSink() as sink, PostfixInstance(tmp_path, next_hop_port=sink.port) as mta:
        await aiosmtplib.send(message, hostname=mta.host, port=mta.port)
        # Postfix queues the message and relays it to [127.0.0.1]:sink.port

Everything lives under ``base_dir / name`` (default ``name="postfix"``)::

    etc/main.cf, etc/master.cf   written by this module (``postfix -c etc``)
    spool/                       queue_directory (post-install creates the queues)
    lib/                         data_directory, owned by the mail_owner ("postfix")
    log/maillog                  maillog_file, written by the postlog service
    log/postfix.out              output of ``postfix start`` / the supervisor

The instance's smtpd listens on ``127.0.0.1:<free port>`` only (``inet_interfaces =
127.0.0.1`` and a ``127.0.0.1:PORT inet ... smtpd`` service; every other inet service of the
stock master.cf is removed), accepts relaying from 127.0.0.0/8, delivers nothing locally and
relays every message to ``relayhost = [127.0.0.1]:next_hop_port`` without DNS or TLS. Retries
are fast (``queue_run_delay = minimal_backoff_time = 1s``, ``maximal_backoff_time = 2s``).
Non-loopback next hops are refused.

The next hop is any SMTP server on loopback: the test suite's aiosmtpd :class:`SmtpSink`, or,
for benchmarks, Postfix's own ``smtp-sink`` (``/usr/sbin/smtp-sink``, from the postfix
package), which :class:`PostfixSmtpSink` runs. By hand, as root, that is::

    smtp-sink -u postfix -4 -c 127.0.0.1:2526 1024     # -u is required when run as root;
                                                       # always name 127.0.0.1, the default
                                                       # is every interface
    # -c prints running counters; -M COUNT exits after COUNT messages; -h NAME sets the
    # greeting name (must differ from the instance's myhostname: Postfix refuses to relay
    # to a server that greets with its own name, "mail loops back to myself")

and a benchmark pushes mail into the instance with ``smtp-source``
(:func:`smtp_source_command` builds the command line)::

    smtp-source -4 -s 20 -m 10000 -l 4096 -f b+abc@bounces.example.com \\
        -t to@example.com 127.0.0.1:<instance.port>

so the chain is smtp-source -> PostfixInstance -> smtp-sink, all on 127.0.0.1.

Process handling: ``postfix -c DIR start`` runs under a small supervisor process (this file,
run as a script) that is a Linux child subreaper, so the daemonized master and its children
stay descendants of the test and are reaped, never left as zombies or orphans, even under a
PID 1 that does not reap. :meth:`PostfixInstance.stop` runs ``postfix -c DIR stop`` and then
makes sure every process of the instance is gone (SIGKILL as the last resort). If the test
process dies without stopping the instance, the supervisor sees its stdin close and stops
Postfix by itself.

Requirements: Postfix >= 3.4 (``maillog_file`` and the ``postlog`` service; no syslog
needed) and root, since the master daemon must start as root. :func:`postfix_available`
says why an instance cannot be started, for tests to skip or fail with.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import ipaddress
import json
import os
import pwd
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sendkit.testing.lifecycle import StartStop

__all__ = [
    "DEFAULT_HOSTNAME",
    "PostfixError",
    "PostfixInstance",
    "PostfixSmtpSink",
    "postfix_available",
    "smtp_source_command",
]

LOOPBACK = "127.0.0.1"
DEFAULT_HOSTNAME = "postfix.sendkit.test"
MIN_VERSION = (3, 4)

_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_PR_SET_CHILD_SUBREAPER = 36
_START_RETRIES = 3
# main.cf settings the instance depends on; ``settings=`` may not override them.
_PROTECTED = frozenset(
    {
        "queue_directory",
        "data_directory",
        "config_directory",
        "multi_instance_directories",
        "maillog_file",
        "maillog_file_prefixes",
        "inet_interfaces",
        "inet_protocols",
        "relayhost",
    }
)


class PostfixError(RuntimeError):
    """Postfix could not be set up, started or stopped; the message carries the log's tail."""


# -- the installation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Installation:
    version: tuple[int, ...]
    version_text: str
    command_directory: Path
    daemon_directory: Path
    meta_directory: Path
    config_directory: Path
    mail_owner: str
    setgid_group: str

    def command(self, name: str) -> str:
        return str(self.command_directory / name)

    def master_cf_template(self) -> Path | None:
        """The stock master.cf: the multi-instance template, Debian's pristine copy, or the
        default instance's file, whichever exists first."""
        for candidate in (
            self.meta_directory / "master.cf.proto",
            Path("/usr/share/postfix/master.cf.dist"),
            self.config_directory / "master.cf",
        ):
            if candidate.is_file():
                return candidate
        return None

    @property
    def compatibility_level(self) -> str:
        return "3.6" if self.version >= (3, 6) else "2"


def _find_command(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in _SBIN_DIRS:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _probe() -> _Installation | str:
    """What ``postconf -d`` says about the installed Postfix, or why there is none."""
    if os.name != "posix":
        return "Postfix test instances need a POSIX system"
    postconf = _find_command("postconf")
    if postconf is None or _find_command("postfix") is None:
        return "Postfix is not installed (no postfix/postconf; run .ci/install-postfix.sh)"
    names = (
        "mail_version",
        "command_directory",
        "daemon_directory",
        "meta_directory",
        "config_directory",
        "mail_owner",
        "setgid_group",
    )
    try:
        # -d: compiled-in defaults, so this works without a default main.cf.
        result = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [postconf, "-d", *names], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {postconf}: {exc}"
    values: dict[str, str] = {}
    for line in result.stdout.splitlines():
        name, sep, value = line.partition(" = ")
        if sep:
            values[name.strip()] = value.strip()
    missing = [name for name in names if name not in values]
    if missing:
        return f"{postconf} -d did not report {', '.join(missing)}: {result.stderr.strip()}"
    version_text = values["mail_version"]
    try:
        version = tuple(int(part) for part in version_text.split("-")[0].split("."))
    except ValueError:
        return f"cannot parse the Postfix version {version_text!r}"
    return _Installation(
        version=version,
        version_text=version_text,
        command_directory=Path(values["command_directory"]),
        daemon_directory=Path(values["daemon_directory"]),
        meta_directory=Path(values["meta_directory"]),
        config_directory=Path(values["config_directory"]),
        mail_owner=values["mail_owner"],
        setgid_group=values["setgid_group"],
    )


def _installation() -> _Installation:
    found = _probe()
    if isinstance(found, str):
        raise PostfixError(found)
    return found


def postfix_available() -> str | None:
    """``None`` when a :class:`PostfixInstance` can be started here, else the reason why not."""
    found = _probe()
    if isinstance(found, str):
        return found
    if found.version < MIN_VERSION:
        wanted = ".".join(map(str, MIN_VERSION))
        return f"Postfix {found.version_text} is too old (maillog_file needs >= {wanted})"
    if os.geteuid() != 0:
        return f"a Postfix instance must be started as root (running as uid {os.geteuid()})"
    try:
        pwd.getpwnam(found.mail_owner)
    except KeyError:
        return f"the Postfix mail_owner {found.mail_owner!r} does not exist"
    try:
        grp.getgrnam(found.setgid_group)
    except KeyError:
        return f"the Postfix setgid_group {found.setgid_group!r} does not exist"
    if found.master_cf_template() is None:
        return f"no stock master.cf found (looked in {found.meta_directory} and elsewhere)"
    return None


# -- small helpers ------------------------------------------------------------------------------


def _free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Postfix's master does
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


def _require_loopback(host: str, what: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"{what} must be a loopback IP address, not {host!r}")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _backdate(path: Path, seconds: float = 60.0) -> None:
    """Postfix will not read a table file changed within the last second or so: it sleeps
    300 ms at a time until the file is old enough (dict_load_file's guard against editors).
    A generated main.cf is complete when written, so make it look old."""
    past = time.time() - seconds
    os.utime(path, (past, past))


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a process from /proc, or None when it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2])


def _alive(pid: int) -> bool:
    """True for a running (not zombie) process."""
    if Path("/proc/self/stat").exists():
        found = _proc_stat(pid)
        return found is not None and found[0] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _processes(predicate: Callable[[str, int, int], bool]) -> list[int]:
    """Live (non-zombie) processes whose (state, ppid, pgid) match ``predicate``."""
    pids = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            found = _proc_stat(int(entry))
            if found is not None and found[0] != "Z" and predicate(*found):
                pids.append(int(entry))
    return pids


def _group_members(pgid: int) -> list[int]:
    return _processes(lambda state, ppid, group: group == pgid)


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def _decode_address(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # /proc/net/tcp6 prints the address as four host-order (little-endian) 32-bit words.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words))


def _tcp_listeners() -> dict[int, tuple[str, int]]:
    """Listening TCP sockets by inode, from /proc/net/tcp and tcp6."""
    found: dict[int, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) < 10 or fields[3] != "0A":  # 0A = LISTEN
                    continue
                address, port = fields[1].split(":")
                found[int(fields[9])] = (_decode_address(address), int(port, 16))
    return found


def _wait_listening(pid: int, host: str, port: int, timeout: float) -> bool:
    """Wait until process ``pid`` listens on host:port. Looks in /proc rather than connecting,
    so servers that count sessions (smtp-sink -c) do not see a probe."""
    deadline = time.monotonic() + timeout
    with_proc = Path("/proc/net/tcp").exists()
    while True:
        if with_proc:
            listeners = _tcp_listeners()
            if any(listeners.get(inode) == (host, port) for inode in _socket_inodes(pid)):
                return True
        else:
            with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
                return True
        if time.monotonic() > deadline or not _alive(pid):
            return False
        time.sleep(0.05)


# -- the instance -------------------------------------------------------------------------------


class PostfixInstance(StartStop):
    """A private Postfix listening on 127.0.0.1, relaying everything to a loopback next hop.

    Use as a context manager (sync or async) or call :meth:`start` / :meth:`stop`. ``port``
    picks the smtpd port (default: a free one, retried if taken meanwhile); ``settings`` adds
    or overrides main.cf parameters (e.g. ``{"in_flow_delay": "0"}`` for benchmarks), except
    the ones that keep the instance private and on loopback.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        next_hop_port: int,
        next_hop_host: str = LOOPBACK,
        port: int | None = None,
        name: str = "postfix",
        hostname: str = DEFAULT_HOSTNAME,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 20.0,
    ) -> None:
        _require_loopback(next_hop_host, "next_hop_host")
        if not 0 < next_hop_port < 65536:
            raise ValueError(f"bad next_hop_port {next_hop_port}")
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"bad port {port}")
        settings = dict(settings or {})
        clash = sorted(_PROTECTED & settings.keys())
        if clash:
            raise ValueError(f"settings may not override {', '.join(clash)}")
        for key, value in settings.items():
            if not key.replace("_", "").isalnum() or "\n" in value:
                raise ValueError(f"bad main.cf setting {key!r} = {value!r}")
        self.host = LOOPBACK
        self.next_hop = (next_hop_host, next_hop_port)
        self.hostname = hostname
        self.root = Path(base_dir).absolute() / name
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "spool"
        self.data_dir = self.root / "lib"
        self.log_dir = self.root / "log"
        self.maillog_path = self.log_dir / "maillog"
        self.output_path = self.log_dir / "postfix.out"
        self._requested_port = port
        self._extra = settings
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._port: int | None = None
        self._install: _Installation | None = None
        self._supervisor: subprocess.Popen[bytes] | None = None
        self._master_pid: int | None = None
        self._process_group: int | None = None  # kept after stop() for processes()
        self._main_cf: dict[str, str] = {}

    def __repr__(self) -> str:
        state = f"port={self._port}" if self.running else "stopped"
        return f"<PostfixInstance {self.root} {state} next_hop={self.next_hop}>"

    # -- what tests look at ------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the Postfix instance has not been started")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def master_pid(self) -> int | None:
        """The master daemon's PID (also its process group) while running."""
        return self._master_pid

    @property
    def running(self) -> bool:
        return self._master_pid is not None and _alive(self._master_pid)

    @property
    def main_cf(self) -> dict[str, str]:
        """The main.cf parameters this instance was started with."""
        return dict(self._main_cf)

    def maillog(self) -> str:
        """The instance's mail log so far ("" before anything was logged)."""
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def queue(self) -> list[dict[str, Any]]:
        """The queue as ``postqueue -j`` reports it: one dict per queued message."""
        output = self._run(self._command("postqueue"), "-c", str(self.config_dir), "-j").stdout
        return [json.loads(line) for line in output.splitlines() if line.strip()]

    def queue_listing(self) -> str:
        """``postqueue -p`` output, for humans and failure messages."""
        return self._run(self._command("postqueue"), "-c", str(self.config_dir), "-p").stdout

    def queue_empty(self) -> bool:
        return not self.queue()

    def flush(self) -> None:
        """Retry deferred mail now (``postqueue -f``)."""
        self._run(self._command("postqueue"), "-c", str(self.config_dir), "-f")

    def wait_for_empty_queue(self, timeout: float = 20.0, interval: float = 0.1) -> None:
        """Block until the queue is empty; TimeoutError (with the queue listing) otherwise."""
        deadline = time.monotonic() + timeout
        while not self.queue_empty():
            if time.monotonic() > deadline:
                listing = self.queue_listing()
                raise TimeoutError(f"Postfix queue not empty after {timeout}s:\n{listing}")
            time.sleep(interval)

    def processes(self) -> list[int]:
        """PIDs of the instance's live processes (the master's process group). Also works
        after :meth:`stop`, to check that nothing survived."""
        if self._process_group is None:
            return []
        return _group_members(self._process_group)

    def listening(self) -> list[tuple[str, int]]:
        """The TCP addresses the instance's processes listen on (Linux /proc)."""
        inodes: set[int] = set()
        for pid in self.processes():
            inodes |= _socket_inodes(pid)
        listeners = _tcp_listeners()
        return sorted({listeners[inode] for inode in inodes if inode in listeners})

    def postconf(self, *args: str) -> str:
        """Run ``postconf -c <config dir> ARGS`` (e.g. ``"-h", "relayhost"``) and return stdout."""
        return self._run(self._command("postconf"), "-c", str(self.config_dir), *args).stdout

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._supervisor is not None:
            raise RuntimeError("the Postfix instance is already running")
        reason = postfix_available()
        if reason is not None:
            raise PostfixError(reason)
        self._install = install = _installation()
        self._process_group = None
        self._prepare_directories(install)
        attempts = 1 if self._requested_port is not None else _START_RETRIES
        for attempt in range(1, attempts + 1):
            port = self._requested_port or _free_port()
            self._configure(install, port)
            try:
                self._launch()
            except PostfixError as exc:
                # The master's own "bind ...: Address already in use" is lost: it dies before
                # the postlog service runs. Find out the same way.
                if not _port_taken(LOOPBACK, port):
                    raise
                if attempt < attempts:
                    continue  # lost the race for the free port; pick another
                raise PostfixError(f"{LOOPBACK}:{port} is already in use. {exc}") from None
            self._port = port
            return

    def stop(self) -> None:
        """Stop the instance with ``postfix stop`` and make sure no process of it survives."""
        supervisor = self._supervisor
        if supervisor is None:
            return
        problems: list[str] = []
        try:
            if self.running:
                result = self._run(
                    self._command("postfix"),
                    "-c",
                    str(self.config_dir),
                    "stop",
                    check=False,
                    timeout=self._stop_timeout,
                )
                if result.returncode != 0:
                    problems.append(f"postfix stop exited {result.returncode}: {result.stderr}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            problems.append(f"postfix stop failed: {exc}")
        finally:
            self._end_supervisor(supervisor)
        leftovers = self.processes()
        if leftovers:
            self._kill_group()
            time.sleep(0.2)
            leftovers = self.processes()
        if self._master_pid is not None and _alive(self._master_pid):
            leftovers.append(self._master_pid)
        self._master_pid = None
        if leftovers:
            problems.append(f"processes still running: {sorted(set(leftovers))}")
            raise PostfixError("; ".join(problems))

    # -- setup -------------------------------------------------------------------------------

    def _prepare_directories(self, install: _Installation) -> None:
        owner = pwd.getpwnam(install.mail_owner)
        self.root.mkdir(parents=True, exist_ok=True)
        # The master opens data_directory/master.lock with the mail_owner's privileges, so
        # "postfix" must be able to walk down to it ("open lock file ...: Permission denied"
        # otherwise). pytest makes its temp dirs 0700: add search (not read) permission for
        # others along the path.
        for directory in (self.root, *self.root.parents):
            mode = directory.stat().st_mode
            if not mode & stat.S_IXOTH:
                if directory.stat().st_uid != os.geteuid():
                    raise PostfixError(f"the Postfix mail_owner cannot traverse {directory}")
                directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
        for directory in (self.root, self.config_dir, self.queue_dir, self.log_dir):
            directory.mkdir(exist_ok=True)
            directory.chmod(0o755)  # Postfix wants root-owned dirs that only root can write
        self.data_dir.mkdir(exist_ok=True)
        os.chown(self.data_dir, owner.pw_uid, owner.pw_gid)
        self.data_dir.chmod(0o700)

    def _settings(self, install: _Installation, port: int) -> dict[str, str]:
        host, next_port = self.next_hop
        settings = {
            "compatibility_level": install.compatibility_level,
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "multi_instance_directories": "",
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": str(self.log_dir),
            "myhostname": self.hostname,
            "mydomain": self.hostname.partition(".")[2] or self.hostname,
            "myorigin": "$myhostname",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "mydestination": "",
            "local_recipient_maps": "",
            "relay_domains": "",
            "alias_maps": "",
            "alias_database": "",
            "relayhost": f"[{host}]:{next_port}",
            "default_transport": "smtp",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "biff": "no",
            "append_dot_mydomain": "no",
            "smtpd_banner": "$myhostname ESMTP $mail_name (SendKit test instance)",
        }
        settings.update(self._extra)
        return settings

    def _configure(self, install: _Installation, port: int) -> None:
        settings = self._settings(install, port)
        listing = "".join(f"{key} = {value}\n" for key, value in settings.items())
        main_cf = self.config_dir / "main.cf"
        main_cf.write_text(f"# Written by sendkit.testing.postfix for {self.root}\n{listing}")
        _backdate(main_cf)
        self._main_cf = settings

        template = install.master_cf_template()
        if template is None:
            raise PostfixError("no stock master.cf to start from")
        shutil.copyfile(template, self.config_dir / "master.cf")
        postconf = [self._command("postconf"), "-c", str(self.config_dir)]
        # Drop every inet listener (smtp, submission, ...) and pipe(8) delivery to programs.
        drop = []
        for line in self._run(*postconf, "-M").stdout.splitlines():
            fields = line.split()
            if len(fields) >= 8 and (fields[1] == "inet" or fields[7] == "pipe"):
                drop.append(f"{fields[0]}/{fields[1]}")
        if drop:
            self._run(*postconf, "-MX", *drop)
        service = f"{LOOPBACK}:{port}"
        self._run(*postconf, "-M", f"{service}/inet={service} inet n - n - - smtpd")
        if not self._run(*postconf, "-M", "postlog/unix-dgram", check=False).stdout.strip():
            # maillog_file needs the postlog service (Postfix >= 3.4 master.cf has it).
            self._run(*postconf, "-M", "postlog/unix-dgram=postlog unix-dgram n - n - 1 postlogd")
        # Debian's master.cf chroots most daemons into the queue directory, which would need
        # copies of /etc files there; a test instance runs unchrooted.
        self._run(*postconf, "-F", "*/*/chroot=n")
        _backdate(self.config_dir / "master.cf")
        # Unknown-parameter warnings, bad values: fail here, with postconf's message.
        checked = self._run(*postconf, "-n", check=False)
        if checked.returncode != 0 or "warning" in checked.stderr:
            raise PostfixError(f"bad main.cf: {checked.stderr.strip()}")

    # -- processes ---------------------------------------------------------------------------

    def _command(self, name: str) -> str:
        install = self._install or _installation()
        self._install = install
        return install.command(name)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
        path = env.get("PATH", "")
        install = self._install
        if install is not None and str(install.command_directory) not in path.split(":"):
            env["PATH"] = (
                f"{path}:{install.command_directory}" if path else str(install.command_directory)
            )
        return env

    def _run(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(  # noqa: S603 - Postfix commands, no shell
            args, capture_output=True, text=True, timeout=timeout, env=self._env(), check=False
        )
        if check and result.returncode != 0:
            raise PostfixError(
                f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
            )
        return result

    def _launch(self) -> None:
        """Start ``postfix start`` under the supervisor and wait for its verdict."""
        pid_file = self.queue_dir / "pid" / "master.pid"
        stale = _read_pid(pid_file)
        if stale is not None and not _alive(stale):
            # Left by a master that failed or was killed; its PID means nothing now.
            pid_file.unlink(missing_ok=True)
        with self.output_path.open("ab") as output:
            supervisor = subprocess.Popen(  # noqa: S603 - this file as a script, no shell
                [
                    sys.executable,
                    "-I",  # stdlib only: do not import the package, the cwd, or PYTHON* env
                    __file__,
                    "supervise",
                    self._command("postfix"),
                    str(self.config_dir),
                    str(self.queue_dir),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=output,
                env=self._env(),
                start_new_session=True,  # Ctrl-C in the terminal is for pytest, not for us
            )
        self._supervisor = supervisor
        try:
            verdict = _read_line(supervisor, self._start_timeout)
        except BaseException:
            self._abandon(supervisor)
            raise
        if verdict == "started 0":
            self._master_pid = _read_pid(pid_file)
            if self._master_pid is not None and _alive(self._master_pid):
                self._process_group = self._master_pid  # the master is a session leader
                return
            verdict = "started, but the master is not running"
        self._abandon(supervisor)
        raise PostfixError(
            f"postfix -c {self.config_dir} start failed ({verdict or 'timed out'}).\n"
            f"--- {self.output_path}\n{_tail(self.output_path)}\n"
            f"--- {self.maillog_path}\n{_tail(self.maillog_path)}"
        )

    def _abandon(self, supervisor: subprocess.Popen[bytes]) -> None:
        # The supervisor ends whatever it started once its stdin closes.
        self._end_supervisor(supervisor)
        self._master_pid = None

    def _end_supervisor(self, supervisor: subprocess.Popen[bytes]) -> None:
        """Close the supervisor's stdin (it then ends whatever is left) and reap it."""
        self._supervisor = None
        try:
            if supervisor.stdin is not None:
                with contextlib.suppress(OSError):
                    supervisor.stdin.close()
            try:
                supervisor.wait(timeout=self._stop_timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
                supervisor.kill()
                supervisor.wait()
        finally:
            if supervisor.stdout is not None:
                supervisor.stdout.close()

    def _kill_group(self) -> None:
        if self._process_group is not None:
            with contextlib.suppress(OSError):
                os.killpg(self._process_group, signal.SIGKILL)


def _read_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    """One line from the process's stdout within ``timeout`` seconds ("" on EOF/timeout)."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return ""
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            return ""
        chunk = os.read(fd, 256)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


# -- smtp-sink and smtp-source ------------------------------------------------------------------


class PostfixSmtpSink(StartStop):
    """Postfix's ``smtp-sink`` on 127.0.0.1 as a next hop for benchmarks: it accepts and
    discards mail as fast as it can. Context manager (sync or async); ``port`` after start.

    Runs ``smtp-sink -u <mail_owner> -4 [-c] [-h hostname] 127.0.0.1:PORT BACKLOG`` (``-u`` is
    required when started as root; smtp-sink drops to that user after binding). Use
    ``PostfixInstance(tmp, next_hop_port=sink.port)`` to relay to it.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        backlog: int = 1024,
        hostname: str = "smtp-sink.sendkit.test",
        counters: bool = False,
        extra_args: Sequence[str] = (),
        output: Path | None = None,
    ) -> None:
        self.host = LOOPBACK
        self._requested_port = port
        self._port: int | None = None
        self.backlog = backlog
        self.hostname = hostname
        self.counters = counters
        self.extra_args = tuple(extra_args)
        self.output = output
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("smtp-sink has not been started")
        return self._port

    def command(self, port: int) -> list[str]:
        binary = _find_command("smtp-sink")
        if binary is None:
            raise PostfixError("smtp-sink is not installed (it comes with the postfix package)")
        args = [binary, "-4", "-h", self.hostname]
        if os.geteuid() == 0:
            args += ["-u", _installation().mail_owner]
        if self.counters:
            args.append("-c")
        return [*args, *self.extra_args, f"{self.host}:{port}", str(self.backlog)]

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("smtp-sink is already running")
        port = self._requested_port or _free_port()
        command = self.command(port)
        sink: IO[bytes] | int = subprocess.DEVNULL
        if self.output is not None:
            sink = self.output.open("ab")
        try:
            self._process = subprocess.Popen(  # noqa: S603 - smtp-sink argv, no shell
                command, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT
            )
        finally:
            if not isinstance(sink, int):
                sink.close()
        if not _wait_listening(self._process.pid, self.host, port, timeout=10):
            self.stop()
            raise PostfixError(f"smtp-sink did not start listening on {self.host}:{port}")
        self._port = port

    def stop(self) -> None:
        process, self._process = self._process, None
        self._port = None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def smtp_source_command(
    port: int,
    *,
    messages: int = 1000,
    sessions: int = 10,
    size: int = 4096,
    sender: str = "b+abc@bounces.example.com",
    recipient: str = "to@example.com",
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The ``smtp-source`` command line that sends ``messages`` messages of ``size`` bytes
    over ``sessions`` parallel sessions to 127.0.0.1:``port`` (e.g. a PostfixInstance)."""
    binary = _find_command("smtp-source")
    if binary is None:
        raise PostfixError("smtp-source is not installed (it comes with the postfix package)")
    return [
        binary,
        "-4",
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-f",
        sender,
        "-t",
        recipient,
        *extra_args,
        f"{LOOPBACK}:{port}",
    ]


# -- the supervisor (this file run as a script) -------------------------------------------------


def _become_subreaper() -> bool:
    """Make orphaned descendants (the daemonized master) children of this process."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def _supervise(postfix: str, config_dir: str, queue_dir: str, grace: float = 10.0) -> int:
    """Run ``postfix -c CONFIG_DIR start``, report "started 0" / "failed N" on stdout, reap
    every descendant until none is left; when stdin closes, end whatever still runs."""
    subreaper = _become_subreaper()
    pid_file = Path(queue_dir) / "pid" / "master.pid"
    reaped: set[int] = set()
    started = threading.Event()
    me = os.getpid()

    def ours(pid: int) -> bool:
        # As subreaper the daemonized master is our child; never signal a recycled PID.
        if not _alive(pid) or pid in reaped:
            return False
        found = _proc_stat(pid)
        return not subreaper or (found is not None and found[1] == me)

    def end_everything() -> None:
        # Unbuffered: a daemon thread blocked in sys.stdin would hang interpreter shutdown.
        while os.read(0, 4096):  # EOF when the parent closes stdin or dies
            pass
        started.wait(grace)
        master = _read_pid(pid_file)
        if master is not None and ours(master):
            with contextlib.suppress(OSError):
                os.kill(master, signal.SIGTERM)  # what "postfix stop" does
        time.sleep(grace)
        while True:  # still here: something ignored SIGTERM
            if master is not None and ours(master):
                with contextlib.suppress(OSError):
                    os.killpg(master, signal.SIGKILL)
            for child in _processes(lambda state, ppid, pgid: ppid == me):
                with contextlib.suppress(OSError):
                    os.kill(child, signal.SIGKILL)
            time.sleep(0.5)

    threading.Thread(target=end_everything, daemon=True).start()
    start = os.posix_spawn(
        postfix,
        [postfix, "-c", config_dir, "start"],
        os.environ,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, 2, 1),  # stdout is our report channel; send its output to log
        ],
    )
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        reaped.add(pid)
        if pid == start:
            code = os.waitstatus_to_exitcode(status)
            with contextlib.suppress(OSError):  # a dead parent must not stop the reaping
                sys.stdout.write(f"{'started' if code == 0 else 'failed'} {code}\n")
                sys.stdout.flush()
            started.set()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "supervise":
        sys.exit(_supervise(sys.argv[2], sys.argv[3], sys.argv[4]))
    sys.exit("usage: postfix.py supervise POSTFIX_COMMAND CONFIG_DIR QUEUE_DIR")
