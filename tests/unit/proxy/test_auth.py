"""Basic authentication per route (`auth=NAME`): realms from the config file, their files over time, and what
a request on a guarded route is answered."""

from __future__ import annotations

import base64
import hashlib
import os
import random
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from discovery.tags import TagError, parse_route_tag
from proxy.auth import CACHE_SIZE, Realm, Realms, RealmSettings
from proxy.config import ConfigError, load
from proxy.dispatch import Plan, plan
from proxy.errors import AuthRealmUnknown, Unauthorized
from proxy.h1.head import Request, check_head
from proxy.htpasswd import md5_crypt

from .worlds import Limits, world


def sha(password: str) -> str:
    return "{SHA}" + base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()


def htpasswd(tmp_path: Path, text: str, name: str = "users.htpasswd") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


USERS = (f"alice:{sha('secret')}\n"
         f"bob:{md5_crypt(b'pa:ss:word', b'salt1234').decode()}\n"
         f"carol:{sha('')}\n"
         "jos\u00e9:" + sha("caf\u00e9") + "\n")


@pytest.fixture
def realm(tmp_path: Path) -> Realm:
    r = Realm(RealmSettings("ops", htpasswd(tmp_path, USERS), "Operations"))
    r.load()
    return r


class TestCredentials:
    """Which Authorization values a realm accepts: the hostile ones included."""

    @pytest.mark.parametrize(
        ("value", "ok"),
        [
            (basic("alice", "secret"), True),
            (basic("alice", "wrong"), False),
            (basic("bob", "pa:ss:word"), True),
            (basic("bob", "pa"), False),
            (basic("carol", ""), True),
            (basic("alice", ""), False),
            (basic("jos\u00e9", "caf\u00e9"), True),
            (b"Basic " + base64.b64encode("jos\u00e9:caf\u00e9".encode("latin-1")), False),
            (basic("mallory", "secret"), False),
            (b"Basic !!!not-base64", False),
            (b"Bearer " + base64.b64encode(b"alice:secret"), False),
            (None, False),
        ],
        ids=["right", "wrong-password", "colon-in-password", "colon-prefix-only", "empty-password",
             "empty-for-nonempty", "utf8-user", "latin1-user-not-the-same-bytes", "unknown-user",
             "malformed-base64", "wrong-scheme", "missing-header"],
    )
    def test_permits(self, realm: Realm, value: bytes | None, ok: bool) -> None:
        assert realm.permits(value) is ok

    def test_challenge_names_the_realm(self, realm: Realm) -> None:
        assert realm.challenge == ((b"WWW-Authenticate", b'Basic realm="Operations", charset="UTF-8"'),)


class TestFileOverTime:
    """The htpasswd file is re-read when it changes; a reload that fails keeps the credentials in force."""

    def test_change_is_picked_up_and_cache_emptied(self, realm: Realm) -> None:
        assert realm.permits(basic("alice", "secret"))  # now remembered
        Path(realm.settings.file).write_text(f"alice:{sha('new')}\n")
        os.utime(realm.settings.file, ns=(1, 1))
        assert realm.changed()
        realm.reload("file changed")
        assert not realm.changed()
        assert not realm.permits(basic("alice", "secret"))
        assert realm.permits(basic("alice", "new"))

    def test_deleted_file_keeps_last_good_credentials(self, realm: Realm) -> None:
        os.unlink(realm.settings.file)
        assert realm.changed()
        with capture_logs() as logs:
            realm.reload("file changed")
        assert [e["event"] for e in logs] == ["auth_reload_failed"]
        assert "cannot read htpasswd file" in logs[0]["error"]
        assert realm.permits(basic("alice", "secret"))
        assert not realm.changed()  # reported once per change, not on every check

    def test_cache_is_bounded(self, realm: Realm, tmp_path: Path) -> None:
        for i in range(CACHE_SIZE + 10):
            realm.permits(basic("alice", "secret") + b" " * (i % 2))  # two spellings of one credential
        assert len(realm._cache) <= CACHE_SIZE

    def test_invalid_lines_are_logged_by_number(self, tmp_path: Path) -> None:
        r = Realm(RealmSettings("ops", htpasswd(tmp_path, "dave:plaintext\n"), "ops"))
        with capture_logs() as logs:
            r.load()
        assert logs[0]["event"] == "auth_entry_invalid" and "line 1" in logs[0]["error"]
        assert "plaintext" not in str(logs)

    def test_sighup_keeps_unchanged_realms_and_adds_new(self, tmp_path: Path) -> None:
        ops = RealmSettings("ops", htpasswd(tmp_path, USERS), "ops")
        realms = Realms([ops])
        realms.load()
        before = realms.get("ops")
        dev = RealmSettings("dev", htpasswd(tmp_path, f"eve:{sha('x')}\n", "dev"), "dev")
        realms.configure([ops, dev])
        assert realms.get("ops") is before
        dev_realm = realms.get("dev")
        assert dev_realm is not None and dev_realm.permits(basic("eve", "x"))
        realms.configure([dev])
        assert realms.get("ops") is None


TABLE, POOLS = world(
    admin=(["urlprefix-/admin auth=ops"], 1),
    secret=(["urlprefix-/secret auth=nope"], 1),
    open=(["urlprefix-/"], 1),
)


def request(path: bytes, *extra: tuple[bytes, bytes]) -> Request:
    req = Request()
    req.target = path
    req.headers = [(b"Host", b"example.com"), *extra]
    check_head(req, "GET", "1.1", True, False)
    return req


def decide(req: Request, realms: Realms | None) -> Plan:
    return plan(req, TABLE, POOLS, Limits(realms=realms), random.Random(1))


class TestGuardedRoutes:
    """What a request on a route with auth= is answered, and what reaches the instance."""

    @pytest.fixture
    def realms(self, tmp_path: Path) -> Realms:
        realms = Realms([RealmSettings("ops", htpasswd(tmp_path, USERS), "Ops")])
        realms.load()
        return realms

    def test_without_credentials_401_with_challenge(self, realms: Realms) -> None:
        err = decide(request(b"/admin"), realms).error
        assert isinstance(err, Unauthorized) and err.status == 401
        assert err.headers == ((b"WWW-Authenticate", b'Basic realm="Ops", charset="UTF-8"'),)

    def test_wrong_credentials_401(self, realms: Realms) -> None:
        assert isinstance(decide(request(b"/admin", (b"Authorization", basic("alice", "x"))), realms).error,
                          Unauthorized)

    def test_two_authorization_fields_refused(self, realms: Realms) -> None:
        req = request(b"/admin", (b"Authorization", basic("alice", "secret")), (b"authorization", basic("m", "x")))
        assert isinstance(decide(req, realms).error, Unauthorized)

    def test_right_credentials_forwarded_without_authorization(self, realms: Realms) -> None:
        req = request(b"/admin", (b"authorization", basic("alice", "secret")), (b"X-Other", b"1"))
        result = decide(req, realms)
        assert result.error is None and result.service == "admin"
        assert req.headers == [(b"Host", b"example.com"), (b"X-Other", b"1")]

    def test_realm_may_forward_authorization(self, tmp_path: Path) -> None:
        realms = Realms([RealmSettings("ops", htpasswd(tmp_path, USERS), "ops", forward=True)])
        realms.load()
        req = request(b"/admin", (b"Authorization", basic("alice", "secret")))
        assert decide(req, realms).error is None
        assert (b"Authorization", basic("alice", "secret")) in req.headers

    @pytest.mark.parametrize("realms", [None, Realms()], ids=["no-realms", "other-realms"])
    def test_unknown_realm_never_served(self, realms: Realms | None) -> None:
        err = decide(request(b"/secret", (b"Authorization", basic("alice", "secret"))), realms).error
        assert isinstance(err, AuthRealmUnknown) and err.status == 503

    def test_unguarded_route_untouched(self, realms: Realms) -> None:
        req = request(b"/page", (b"Authorization", b"Bearer t"))
        assert decide(req, realms).error is None
        assert (b"Authorization", b"Bearer t") in req.headers

    def test_a_shared_route_is_guarded_if_one_side_asks(self, realms: Realms) -> None:
        table, pools = world(blue=(["urlprefix-/shop"], 1), green=(["urlprefix-/shop auth=ops"], 1))
        for seed in range(20):  # whichever side the draw would pick
            result = plan(request(b"/shop"), table, pools, Limits(realms=realms), random.Random(seed))
            assert isinstance(result.error, Unauthorized)


class TestTagAndConfig:
    """auth=NAME in a tag, and [auth.NAME] tables in the config file, checked where they are written."""

    def test_tag_names_the_realm(self) -> None:
        assert parse_route_tag("urlprefix-/admin auth=ops").options.auth == "ops"

    def test_tag_realm_must_be_a_name(self) -> None:
        with pytest.raises(TagError, match="must name a realm"):
            parse_route_tag("urlprefix-/admin auth=a/b")

    def test_table_loads(self, tmp_path: Path) -> None:
        file = htpasswd(tmp_path, USERS)
        config = tmp_path / "f.toml"
        config.write_text(f'[auth.ops]\nfile = "{file}"\nrealm = "Ops team"\nforward_authorization = true\n')
        (realm,) = load(config_file=str(config), environ={}, flags={}).auth
        assert realm == RealmSettings("ops", file, "Ops team", True, f"{config}:1")

    @pytest.mark.parametrize(
        ("body", "line", "expected"),
        [
            ('[auth.ops]\nfile = "{missing}"\n', 2, "key 'auth.ops.file': cannot read htpasswd file {missing}: "
             "No such file or directory"),
            ("[auth.ops]\nrealm = \"x\"\n", 2, "key 'auth.ops.file': the htpasswd file's path is required"),
            ('[auth.ops]\nfile = "{file}"\nrealm = "a\\"b"\n', 2, "key 'auth.ops.realm'"),
            ('[auth.ops]\nfile = "{file}"\nforward_authorization = "yes"\n', 2,
             "key 'auth.ops.forward_authorization'"),
            ('[auth.ops]\nfile = "{file}"\nrefresh = 5\n', 2, "auth.ops must be a table of file, realm"),
            ('[auth.ops]\nfile = "{file}"\n\n[[routes]]\nroute = "/x auth=other"\nservice = "x"\n', 5,
             "key 'route': auth=other names no [auth.NAME] table"),
        ],
        ids=["missing-file", "no-file", "quote-in-realm", "forward-not-bool", "unknown-key", "route-unknown-realm"],
    )
    def test_errors_name_file_line_and_key(self, tmp_path: Path, body: str, line: int, expected: str) -> None:
        names = {"file": htpasswd(tmp_path, USERS), "missing": str(tmp_path / "gone")}
        config = tmp_path / "f.toml"
        config.write_text("\n" + body.format(**names))
        with pytest.raises(ConfigError) as caught:
            load(config_file=str(config), environ={}, flags={})
        assert str(caught.value).startswith(f"{config}:{line}: ")
        assert expected.format(**names) in str(caught.value)
