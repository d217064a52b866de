"""Basic authentication per route: Fabio's `auth=NAME`, a realm declared in the config file's `[auth.NAME]`.

Each realm reads an htpasswd file (proxy/htpasswd.py parses and verifies) when Ferryman starts, where a file
that cannot be read is a config error naming the file and the key, and again whenever the file changes (its
modification time, size or inode, checked every `RECHECK_S`) and on SIGHUP. A reload that fails keeps the
credentials loaded before and says so (`auth_reload_failed`): a deleted or half-written file never locks
everyone out, nor lets anyone in.

A bcrypt check costs milliseconds to a tenth of a second of CPU by design, on the worker's event loop, so a
successful check is remembered: a bounded LRU of keyed digests of the Authorization value (never the password
itself), emptied when the file changes. A failed check is never remembered.

A route naming a realm the configuration does not declare is answered 503 (`auth_realm_unknown`), never served
without authentication (Fabio answers 401 there; either way nothing reaches the instances).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from discovery.static import file_stamp

from .htpasswd import basic_credentials, parse, verify

log = structlog.get_logger("ferryman")

RECHECK_S: Final = 2.0  # how often the files' stamps are compared (a stat per realm)
CACHE_SIZE: Final = 1024  # successful checks remembered per realm
AUTHORIZATION: Final = b"authorization"


@dataclass(frozen=True, slots=True)
class RealmSettings:
    """One `[auth.NAME]` table of the config file."""

    name: str
    file: str
    realm: str  # the name the challenge shows (`realm=` of WWW-Authenticate); the table's name by default
    forward: bool = False  # forward_authorization: the instances get the client's Authorization header
    origin: str = ""  # file:line of the table, for messages


class AuthError(Exception):
    """An htpasswd file that cannot be read; the message names it."""


def read_htpasswd(settings: RealmSettings) -> dict[bytes, bytes]:
    """The users of a realm's file; AuthError naming the file when it cannot be read. Lines left out are
    logged (by number) as `auth_entry_invalid`."""
    try:
        data = Path(settings.file).read_bytes()
    except OSError as exc:
        raise AuthError(f"cannot read htpasswd file {settings.file}: {exc.strerror or exc}") from exc
    parsed = parse(data)
    for problem in parsed.problems:
        log.warning("auth_entry_invalid", realm=settings.name, file=settings.file, error=problem)
    return dict(parsed.users)


class Realm:
    """A realm's credentials in force, and the checks that passed lately."""

    __slots__ = ("_cache", "_key", "_stamp", "_users", "challenge", "settings")

    def __init__(self, settings: RealmSettings) -> None:
        self.settings = settings
        quoted = settings.realm.encode("utf-8")  # checked at load: no quote, backslash or control character
        # RFC 7617 §2.1: charset="UTF-8" tells clients to send a non-ASCII user name as UTF-8.
        self.challenge = ((b"WWW-Authenticate", b'Basic realm="' + quoted + b'", charset="UTF-8"'),)
        self._users: dict[bytes, bytes] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._cache: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._key = os.urandom(32)  # the cache's digests are keyed: they reveal nothing outside this process

    @property
    def forward(self) -> bool:
        return self.settings.forward

    @property
    def users(self) -> int:
        return len(self._users)

    def load(self) -> None:
        """(Re)read the file; AuthError keeps the credentials in force. The stamp is taken either way, so a
        file that does not load is reported once per change."""
        self._stamp = file_stamp(self.settings.file)
        users = read_htpasswd(self.settings)
        self._users = users
        self._cache.clear()

    def changed(self) -> bool:
        return file_stamp(self.settings.file) != self._stamp

    def reload(self, reason: str) -> None:
        try:
            self.load()
        except AuthError as exc:
            log.error("auth_reload_failed", realm=self.settings.name, file=self.settings.file, error=str(exc),
                      reason=reason, detail="the credentials loaded before stay in use")
            return
        log.info("auth_loaded", realm=self.settings.name, file=self.settings.file, users=len(self._users),
                 reason=reason)

    def permits(self, authorization: bytes | None) -> bool:
        """Whether an Authorization value carries a user and password of this realm."""
        if authorization is None:
            return False
        digest = hashlib.blake2b(authorization, key=self._key, digest_size=16).digest()
        cache = self._cache
        if digest in cache:
            cache.move_to_end(digest)
            return True
        credentials = basic_credentials(authorization)
        if credentials is None:
            return False
        stored = self._users.get(credentials[0])
        if stored is None or not verify(credentials[1], stored):
            return False
        cache[digest] = None
        if len(cache) > CACHE_SIZE:
            cache.popitem(last=False)
        return True


class Realms:
    """The realms the configuration declares, by name; replaced whole (one assignment) on SIGHUP."""

    def __init__(self, tables: Iterable[RealmSettings] = ()) -> None:
        self.by_name: dict[str, Realm] = {t.name: Realm(t) for t in tables}

    def __bool__(self) -> bool:
        return bool(self.by_name)

    def get(self, name: str) -> Realm | None:
        return self.by_name.get(name)

    def load(self) -> None:
        """At start: every file read; AuthError (naming the table, the key and the file) on the first that
        cannot be."""
        for realm in self.by_name.values():
            try:
                realm.load()
            except AuthError as exc:
                where = f"{realm.settings.origin}: " if realm.settings.origin else ""
                raise AuthError(f"{where}key 'auth.{realm.settings.name}.file': {exc}") from exc
            log.info("auth_loaded", realm=realm.settings.name, file=realm.settings.file, users=realm.users)

    def configure(self, tables: Iterable[RealmSettings]) -> None:
        """SIGHUP: the realms declared now. A realm whose table is unchanged keeps its credentials and cache
        and is re-read; a new or changed one is read now (a failure leaves it without users: 401 to all)."""
        by_name: dict[str, Realm] = {}
        for table in tables:
            realm = self.by_name.get(table.name)
            if realm is None or realm.settings != table:
                realm = Realm(table)
            realm.reload("sighup")
            by_name[table.name] = realm
        self.by_name = by_name

    async def watch(self, interval: float = RECHECK_S) -> None:
        """Re-read a realm's file when it changes, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            for realm in list(self.by_name.values()):
                if realm.changed():
                    realm.reload("file changed")
