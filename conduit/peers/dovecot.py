"""A private Dovecot IMAP/POP3 server for tests, benchmarks and `conduit demo`.

Each `Dovecot` is its own instance: its own config file (started with `dovecot -F -c FILE`),
loopback listeners on free ports, a passwd-file and a maildir per user. Nothing of
the system's Dovecot (config, state, service) is touched. Recipe: shared/real-peers.md.

    async with Dovecot(tmp_path) as dovecot:
        dovecot.add_user("alice@example.com", "secret")
        dovecot.deliver("alice@example.com", raw_message)     # straight into the maildir
        uid = await dovecot.append("alice@example.com", "secret", raw_message)   # real APPEND

With `oauth2=OAuth2Passdb(introspection_url)` the instance also takes OAuth 2.0 bearer tokens
(SASL XOAUTH2 and OAUTHBEARER, IMAP and POP3): Dovecot's `oauth2` passdb asks that URL about
every token (RFC 7662 token introspection) and lets the login in when the token is active and
its user attribute names the login user. Passwords (PLAIN, LOGIN) keep working beside it.

Where things live: the config file and dovecot.log are in `base_dir`. Mail, the passwd-file
and Dovecot's run directory (unix sockets, master.pid) must be reachable by Dovecot's
unprivileged users and socket paths must stay short, so they go in `base_dir` only when its
path is short and world-traversable; otherwise (pytest's tmp_path is neither) in a private
directory under /tmp, removed by `__aexit__` (or when the object is collected). `data_dir`
tells which.
"""

from __future__ import annotations

import asyncio
import grp
import itertools
import os
import pwd
import re
import resource
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import aioimaplib

from conduit.peers.ports import LOOPBACK, free_ports

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
# Dovecot builds socket paths like <run>/login/imap-master (sun_path holds 108 bytes).
_MAX_DATA_DIR_LEN = 60
_DH_PARAMS = Path("/usr/share/dovecot/dh.pem")


class DovecotError(RuntimeError):
    """Dovecot did not start or stop as asked; the message carries the log tail."""


@dataclass(frozen=True)
class OAuth2Passdb:
    """How Dovecot's `oauth2` passdb validates bearer tokens (Dovecot 2.3, dovecot-core).

    Dovecot sends each token to `introspection_url` (`introspection_mode` "post": a form
    `token=...`, as RFC 7662 says; "get": the token appended to the URL; "auth": a GET with
    `Authorization: Bearer`) and reads the JSON object it answers. The login succeeds when
    `active_attribute` (if set) has `active_value` and `username_attribute` equals the login
    user (both lower-cased: Dovecot's default `username_format = %Lu`); anything else, such as RFC 7662's `{"active": false}`, fails the login. Basic
    credentials of the resource server, if the endpoint wants them, go in the URL
    (`http://id:secret@host/introspect`).
    """

    introspection_url: str
    introspection_mode: str = "post"
    username_attribute: str = "username"
    active_attribute: str | None = "active"
    active_value: str = "true"
    timeout_msecs: int = 10_000

    def __post_init__(self) -> None:
        if self.introspection_mode not in ("post", "get", "auth"):
            raise ValueError(f"introspection_mode must be post, get or auth, not {self.introspection_mode!r}")
        values = (self.introspection_url, self.username_attribute, self.active_attribute or "",
                  self.active_value)
        if any(c in value for value in values for c in "\n\r"):
            raise ValueError("OAuth2Passdb values must be single lines")


class Dovecot:
    """A private Dovecot instance on loopback (see the module docstring)."""

    def __init__(
        self,
        base_dir: Path,
        *,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        oauth2: OAuth2Passdb | None = None,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("give both tls_cert and tls_key, or neither")
        self.base_dir = Path(base_dir).absolute()
        self.tls_cert = Path(tls_cert).absolute() if tls_cert else None
        self.tls_key = Path(tls_key).absolute() if tls_key else None
        self.oauth2 = oauth2
        self.host = LOOPBACK
        self.imap_port = 0
        self.pop3_port = 0
        self.imaps_port: int | None = None
        self.pop3s_port: int | None = None
        self.data_dir: Path | None = None  # chosen at first start, kept across restarts
        self._remove_private_data: weakref.finalize | None = None
        self._process: subprocess.Popen | None = None
        self._mail_uid = 0
        self._mail_gid = 0
        # Maildir file names must be unique; this token separates instances and processes.
        self._token = secrets.token_hex(4)
        self._seq = itertools.count()

    # -- paths -----------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.base_dir / "dovecot.conf"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "dovecot.log"

    @property
    def _stderr_path(self) -> Path:
        return self.base_dir / "dovecot.stderr"

    @property
    def _data(self) -> Path:
        if self.data_dir is None:
            raise DovecotError("Dovecot has not been started yet (no data directory)")
        return self.data_dir

    @property
    def _run_dir(self) -> Path:
        return self._data / "run"

    @property
    def _oauth2_config_path(self) -> Path:
        # Read by the auth process (an unprivileged user): beside the passwd-files, not in base_dir.
        return self._data / "oauth2.conf.ext"

    def maildir(self, address: str, folder: str = "INBOX") -> Path:
        """The maildir of `folder` for `address` (maildir++: subfolder `Name` is `.Name`)."""
        root = self._data / "mail" / address.lower()
        if folder.upper() == "INBOX":
            return root
        return root / ("." + folder.replace("/", "."))

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Dovecot:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
        if self._remove_private_data is not None:
            self._remove_private_data()

    async def start(self) -> None:
        """Write the config, start Dovecot, and wait until IMAP and POP3 greet."""
        if self._process is not None:
            raise DovecotError("this Dovecot is already running")
        self._prepare_dirs()
        # The ports were free when chosen; if another process takes one before Dovecot
        # binds it, Dovecot exits and we try again with new ports.
        for attempt in range(3):
            self._choose_ports()
            self._write_config()
            self._spawn()
            try:
                await self._wait_until_serving()
                return
            except DovecotError:
                lost_race = "Address already in use" in self.log_tail(20)
                await self.stop()
                if not lost_race or attempt == 2:
                    raise

    async def stop(self) -> None:
        """Stop the master (it stops its children) and wait until master.pid is gone."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            # The whole group: children stop at once instead of being shut down one by one
            # by the master, which takes a second.
            os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                break
            await asyncio.sleep(0.02)
        # Children still finishing a session after the master left would keep the listening
        # sockets they inherited; they share the master's process group (see _spawn).
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pid_file = self._run_dir / "master.pid"
        while pid_file.exists():
            if time.monotonic() > deadline:
                pid_file.unlink(missing_ok=True)  # the master is dead: the file is stale
                break
            await asyncio.sleep(0.02)

    def _prepare_dirs(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        mail = pwd.getpwnam("mail")
        self._mail_uid, self._mail_gid = mail.pw_uid, mail.pw_gid
        if self.data_dir is None:
            if len(str(self.base_dir)) <= _MAX_DATA_DIR_LEN and _world_traversable(self.base_dir):
                self.data_dir = self.base_dir
            else:
                self.data_dir = Path(tempfile.mkdtemp(prefix="conduit-dovecot-"))
                # Nobody could find it once this object is gone: remove it then at the latest.
                self._remove_private_data = weakref.finalize(
                    self, shutil.rmtree, self.data_dir, ignore_errors=True
                )
        data = self._data
        data.chmod(0o755)
        self._run_dir.mkdir(exist_ok=True)
        self._run_dir.chmod(0o755)
        (data / "mail").mkdir(exist_ok=True)
        os.chown(data / "mail", self._mail_uid, self._mail_gid)
        pid_file = self._run_dir / "master.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().strip() or 0)
            if pid and _alive(pid):
                raise DovecotError(f"another Dovecot (pid {pid}) runs on {self._run_dir}")
            pid_file.unlink()

    def _choose_ports(self) -> None:
        tls = self.tls_cert is not None
        ports = free_ports(4 if tls else 2)
        self.imap_port, self.pop3_port = ports[0], ports[1]
        self.imaps_port, self.pop3s_port = (ports[2], ports[3]) if tls else (None, None)

    def _write_config(self) -> None:
        if self.oauth2 is not None:
            _write_private(self._oauth2_config_path, _render_oauth2_config(self.oauth2))
        self.config_path.write_text(
            _render_config(
                data=self._data,
                log_path=self.log_path,
                mail_uid=self._mail_uid,
                imap_port=self.imap_port,
                pop3_port=self.pop3_port,
                imaps_port=self.imaps_port or 0,
                pop3s_port=self.pop3s_port or 0,
                tls_cert=self.tls_cert,
                tls_key=self.tls_key,
                oauth2_config=self._oauth2_config_path if self.oauth2 is not None else None,
            )
        )

    def _spawn(self) -> None:
        with open(self._stderr_path, "ab") as stderr:
            # -F keeps the master in the foreground: our child, so we know when it dies.
            self._process = subprocess.Popen(
                ["dovecot", "-F", "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                preexec_fn=_raise_fd_limit,
                # its own process group: stop() signals Dovecot's processes and nothing else
                start_new_session=True,
            )

    async def _wait_until_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        pending = [(self.imap_port, b"* OK"), (self.pop3_port, b"+OK")]
        while pending:
            assert self._process is not None
            if self._process.poll() is not None:
                raise DovecotError(
                    f"dovecot exited with status {self._process.returncode} while starting;"
                    f" log tail:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise DovecotError(
                    f"dovecot did not greet on {self.host}:{pending[0][0]} within"
                    f" {START_TIMEOUT:.0f} s; log tail:\n{self.log_tail()}"
                )
            port, greeting = pending[0]
            if await _greets(self.host, port, greeting):
                pending.pop(0)
            else:
                await asyncio.sleep(0.02)

    # -- users -----------------------------------------------------------------------------

    def add_user(self, address: str, password: str) -> None:
        """Add a login; effective at once, also while Dovecot runs."""
        path = self._passwd_file(address)
        if path.exists():
            raise ValueError(f"user {address} exists already")
        self._write_passwd_file(path, address, password)

    def add_master_user(self, name: str, password: str) -> None:
        """Add a master login (a service account): with SASL PLAIN it signs in to any user's mailbox,
        naming that user as the authorization identity (RFC 4616), the way a profile with
        impersonation reads every mailbox with one set of credentials."""
        path = self._passwd_file(name, "masters")
        if path.exists():
            raise ValueError(f"master user {name} exists already")
        self._write_passwd_file(path, name, password)

    def set_password(self, address: str, password: str) -> None:
        """Change a user's password; effective for every login after this returns.

        Dovecot rereads a passwd-file at most once per second (on its clock's whole seconds):
        a login in the same second as this change could still see the old password, so while
        Dovecot runs this waits, at most a second, until that second is over.
        """
        path = self._passwd_file(address)
        if not path.exists():
            raise KeyError(address)
        self._write_passwd_file(path, address, password)
        if self._process is not None:
            changed_at = time.time()
            ready_at = int(changed_at) + 1.02  # a little past the boundary: clocks read apart
            while (now := time.time()) < ready_at:
                time.sleep(ready_at - now)

    def _passwd_file(self, address: str, kind: str = "passwd") -> Path:
        name = address.lower()
        if not name or any(c in name for c in ":/\n") or name.startswith("."):
            raise ValueError(f"not usable as a login: {address!r}")
        return self._data / kind / name

    def _write_passwd_file(self, path: Path, address: str, password: str) -> None:
        if ":" in password or "\n" in password:
            raise ValueError("passwords must not contain ':' or newlines")
        path.parent.mkdir(mode=0o750, exist_ok=True)
        dovecot_gid = grp.getgrnam("dovecot").gr_gid
        os.chown(path.parent, 0, dovecot_gid)  # only the auth process (user dovecot) reads
        tmp = path.parent / f".{path.name}.tmp"
        tmp.write_text(f"{address.lower()}:{{PLAIN}}{password}\n")
        os.chown(tmp, 0, dovecot_gid)
        tmp.chmod(0o640)
        # Dovecot reloads a passwd-file when its mtime (whole seconds) or size changes; a
        # same-length password written in the same second must still change the mtime.
        try:
            previous = int(path.stat().st_mtime)
        except FileNotFoundError:
            previous = 0
        mtime = max(int(time.time()), previous + 1)
        os.utime(tmp, (mtime, mtime))
        os.replace(tmp, path)

    # -- mail ------------------------------------------------------------------------------

    def deliver(self, address: str, raw: bytes, folder: str = "INBOX") -> None:
        """Put one message straight into the user's maildir, as a delivery agent would."""
        self.deliver_many(address, [raw], folder)

    def deliver_many(self, address: str, raws: Iterable[bytes], folder: str = "INBOX") -> int:
        """Deliver many messages fast, in order (their UIDs follow it). Returns the count.

        No fsync: this is test data, not mail to keep.
        """
        box = self._ensure_maildir(address, folder)
        tmp_dir, new_dir = box / "tmp", box / "new"
        now = time.time()
        # Dovecot gives new messages UIDs in file name order: seconds, microseconds, then
        # the name as a string, hence the zero-padded sequence number.
        prefix = f"{int(now)}.M{int(now % 1 * 1_000_000)}P{os.getpid()}R{self._token}Q"
        # ",S=" tells Dovecot the size without a stat
        names = [(f"{prefix}{next(self._seq):09d}.conduit,S={len(raw)}", raw) for raw in raws]

        def write(item: tuple[str, bytes]) -> str:
            name, raw = item
            fd = os.open(tmp_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.fchown(fd, self._mail_uid, self._mail_gid)
            with open(fd, "wb") as f:
                f.write(raw)
            return name

        # Creating the files is the slow part (~0.3-0.6 ms each on this disk) and threads
        # overlap it well; the renames into new/, which make each message appear whole to
        # Dovecot, stay in order so a session syncing meanwhile still sees them in order.
        if len(names) < 32:
            written: Iterable[str] = map(write, names)
            pool = None
        else:
            pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="deliver")
            written = pool.map(write, names, chunksize=16)
        try:
            for name in written:
                os.rename(tmp_dir / name, new_dir / name)
        finally:
            if pool is not None:
                pool.shutdown()
        return len(names)

    def _ensure_maildir(self, address: str, folder: str) -> Path:
        root = self.maildir(address)
        box = self.maildir(address, folder)
        for path in (root.parent, root, box, box / "cur", box / "new", box / "tmp"):
            if not path.is_dir():
                path.mkdir(mode=0o700, exist_ok=True)
                os.chown(path, self._mail_uid, self._mail_gid)
        if box != root and not (box / "maildirfolder").exists():
            (box / "maildirfolder").touch(0o600)
            os.chown(box / "maildirfolder", self._mail_uid, self._mail_gid)
        return box

    async def append(self, address: str, password: str, raw: bytes, folder: str = "INBOX") -> int:
        """Store a message with a real IMAP APPEND; returns its UID (UIDPLUS APPENDUID).

        Through aioimaplib, the design's async IMAP library: a test or the demo appends a message at
        a time, where its speed does not matter (ingest reads with its own client for speed:
        services/ingest/imap_client.py says why)."""
        imap = aioimaplib.IMAP4(self.host, self.imap_port, timeout=30)
        try:
            await imap.wait_hello_from_server()
            _expect_ok(await imap.login(address, password), "LOGIN")
            mailbox = _quote_mailbox(folder)
            answer = await imap.append(raw, mailbox)
            if answer.result != "OK" and any(b"TRYCREATE" in line for line in _lines(answer)):
                _expect_ok(await imap.create(mailbox), f"CREATE {folder}")
                answer = await imap.append(raw, mailbox)
            _expect_ok(answer, f"APPEND to {folder}")
            match = re.search(rb"\[APPENDUID \d+ (\d+)\]", b" ".join(_lines(answer)))
            if not match:
                raise DovecotError(f"APPEND answered without APPENDUID: {answer.lines!r}")
            await imap.logout()
            return int(match.group(1))
        finally:
            if imap.protocol is not None and imap.protocol.transport is not None:
                imap.protocol.transport.close()

    def message_count(self, address: str, folder: str = "INBOX") -> int:
        """Messages in the maildir now (cur/ + new/): what is left after deletes and expunges."""
        box = self.maildir(address, folder)
        return sum(len(os.listdir(box / sub)) for sub in ("cur", "new") if (box / sub).is_dir())

    def log_tail(self, n: int = 50) -> str:
        """The last `n` lines of dovecot.log and of the master's own stderr."""
        parts = []
        for path in (self._stderr_path, self.log_path):
            try:
                lines = path.read_text(errors="replace").splitlines()
            except FileNotFoundError:
                continue
            if lines:
                parts.append(f"--- {path.name}\n" + "\n".join(lines[-n:]))
        return "\n".join(parts)


def _render_config(
    *,
    data: Path,
    log_path: Path,
    mail_uid: int,
    imap_port: int,
    pop3_port: int,
    imaps_port: int,
    pop3s_port: int,
    tls_cert: Path | None,
    tls_key: Path | None,
    oauth2_config: Path | None = None,
) -> str:
    if tls_cert and tls_key:
        tls = f"ssl = yes\nssl_cert = <{tls_cert}\nssl_key = <{tls_key}\n"
        if _DH_PARAMS.exists():
            tls += f"ssl_dh = <{_DH_PARAMS}\n"
    else:
        tls = "ssl = no\n"
    mechanisms = "plain login"
    password_mechanisms = oauth2_passdb = ""
    if oauth2_config is not None:
        mechanisms += " xoauth2 oauthbearer"
        # Passwords go only to the passwd-files and tokens only to the token check: a token is
        # never compared with a password, nor a password sent to the introspection endpoint.
        password_mechanisms = "  mechanisms = plain login\n"
        oauth2_passdb = f"""\
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {oauth2_config}
}}
"""
    return f"""\
# Written by conduit.peers.dovecot: a private instance on loopback for tests and benchmarks.
base_dir = {data}/run
state_dir = {data}/run
log_path = {log_path}
protocols = imap pop3
listen = {LOOPBACK}
{tls}disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
auth_verbose = yes
# tests check that a wrong password fails; the default 2 s penalty would only slow them down
auth_failure_delay = 0 secs
mail_location = maildir:{data}/mail/%u
# test data, not mail to keep: no fsync makes bulk APPEND and flag changes much faster
mail_fsync = never
default_internal_user = dovecot
default_internal_group = dovecot
# login processes refuse to run as root
default_login_user = dovenull
# the mail processes run as `mail` (they refuse uid 0)
first_valid_uid = {mail_uid}
# benchmarks hold hundreds of connections (IDLE: one per mailbox), all from 127.0.0.1;
# the sum of the process limits below stays under default_client_limit (auth connections)
default_process_limit = 1000
default_client_limit = 10000
# IDLE pushes should arrive within a second
imap_idle_notify_interval = 1 secs
mailbox_idle_check_interval = 1 secs

# One passwd-file per user: Dovecot rereads a passwd-file at most once per second, but opens
# a file it has not seen at once, so a user added while running can log in immediately.
passdb {{
  driver = passwd-file
{password_mechanisms}  args = scheme=PLAIN {data}/passwd/%u
}}
# Master logins (``add_master_user``): SASL PLAIN with the user as authorization identity; the user
# must exist too (pass = yes: the passdb above is still asked about them).
passdb {{
  driver = passwd-file
  master = yes
  pass = yes
{password_mechanisms}  args = scheme=PLAIN {data}/masters/%u
}}
{oauth2_passdb}userdb {{
  driver = static
  args = uid=mail gid=mail home={data}/mail/%u
}}

protocol imap {{
  mail_max_userip_connections = 10000
}}
protocol pop3 {{
  mail_max_userip_connections = 10000
}}

# Login processes in "high-performance" mode (service_count = 0): a few long-lived processes
# serve many clients each, instead of one fork per connection.
service imap-login {{
  chroot =
  service_count = 0
  process_min_avail = 2
  process_limit = 100
  client_limit = 1000
  inet_listener imap {{
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = {imaps_port}
    ssl = yes
  }}
}}
service pop3-login {{
  chroot =
  service_count = 0
  process_min_avail = 1
  process_limit = 100
  client_limit = 1000
  inet_listener pop3 {{
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    port = {pop3s_port}
    ssl = yes
  }}
}}
# One mail process per session; all users share uid `mail`, so a process may be reused for
# later sessions (service_count) and a few wait ready (process_min_avail): no fork per login.
service imap {{
  process_limit = 5000
  client_limit = 1
  service_count = 100
  process_min_avail = 2
}}
service pop3 {{
  process_limit = 1000
  client_limit = 1
}}
# Every client is 127.0.0.1: anvil's per-IP auth penalty would let one test's failed logins
# delay every later login by seconds. An auth process that cannot reach this socket runs
# without the penalty (Dovecot's documented way to turn it off).
service anvil {{
  chroot =
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""


def _render_oauth2_config(oauth2: OAuth2Passdb) -> str:
    active = ""
    if oauth2.active_attribute:
        active = f"active_attribute = {oauth2.active_attribute}\nactive_value = {oauth2.active_value}\n"
    return f"""\
# Written by conduit.peers.dovecot: the oauth2 passdb of a private instance (RFC 7662 introspection).
introspection_url = {oauth2.introspection_url}
introspection_mode = {oauth2.introspection_mode}
username_attribute = {oauth2.username_attribute}
{active}timeout_msecs = {oauth2.timeout_msecs}
"""


def _write_private(path: Path, text: str) -> None:
    """Write a file only root and Dovecot's auth process (group dovecot) may read."""
    tmp = path.parent / f".{path.name}.tmp"
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.fchown(fd, 0, grp.getgrnam("dovecot").gr_gid)
    with open(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _lines(answer: aioimaplib.Response) -> list[bytes]:
    return [line if isinstance(line, bytes) else str(line).encode() for line in answer.lines]


def _expect_ok(answer: aioimaplib.Response, what: str) -> None:
    if answer.result != "OK":
        raise DovecotError(f"{what} failed: {answer.result} {b' '.join(_lines(answer))!r}")


def _quote_mailbox(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def _greets(host: str, port: int, greeting: bytes) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (TimeoutError, OSError):
        return False
    try:
        line = await asyncio.wait_for(reader.readline(), 2.0)
        return line.startswith(greeting)
    except (TimeoutError, OSError):
        return False
    finally:
        writer.close()


def _world_traversable(path: Path) -> bool:
    """True when every directory from / to `path` lets other users pass (o+x)."""
    return all(os.stat(d).st_mode & 0o001 for d in (path, *path.parents))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _raise_fd_limit() -> None:
    # Thousands of client connections: Dovecot warns and refuses clients past `ulimit -n`.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
