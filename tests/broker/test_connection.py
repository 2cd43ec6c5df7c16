"""MESH_REDIS_URL's forms taken apart, bad ones refused with the password masked, and the clients
made for each form (no server needed: nothing here connects)."""

from __future__ import annotations

import pytest
import redis
from redis.sentinel import SentinelConnectionPool

from mesh.broker import MeshSettings
from mesh.broker.connection import configured, connect, masked_url, parse_url
from mesh.contracts import ConfigError

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(("url", "hosts", "db", "user", "password", "service"), [
    ("redis://127.0.0.1:6379/0", [("127.0.0.1", 6379)], 0, None, None, None),
    ("redis://localhost", [("localhost", 6379)], 0, None, None, None),
    (f"redis://:{SECRET}@h:1/2", [("h", 1)], 2, None, SECRET, None),
    (f"redis://{SECRET}@h:1/2", [("h", 1)], 2, None, SECRET, None),  # redis-py's reading of a lone userinfo
    (f"redis://mesh:{SECRET}@h/3", [("h", 6379)], 3, "mesh", SECRET, None),
    ("redis://mesh:p%40ss%3Aw@h", [("h", 6379)], 0, "mesh", "p@ss:w", None),
    ("rediss://[::1]:6380/1", [("::1", 6380)], 1, None, None, None),
    (f"redis+sentinel://:{SECRET}@a:26379,b:26380,c/mymaster/4",
     [("a", 26379), ("b", 26380), ("c", 26379)], 4, None, SECRET, "mymaster"),
    ("redis+sentinel://a/mymaster", [("a", 26379)], 0, None, None, "mymaster"),
    (f"redis+cluster://mesh:{SECRET}@a:7000,b:7001,c/", [("a", 7000), ("b", 7001), ("c", 6379)], 0, "mesh", SECRET,
     None),
    ("rediss+cluster://a:7000/0", [("a", 7000)], 0, None, None, None),
    ("redis+cluster://a:7000", [("a", 7000)], 0, None, None, None),
])
def test_every_url_form_is_taken_apart(url, hosts, db, user, password, service):
    address = parse_url(url)
    assert (list(address.hosts), address.db, address.username, address.password, address.service) == \
        (hosts, db, user, password, service)


@pytest.mark.parametrize(("url", "says"), [
    (f"http://u:{SECRET}@h/0", "scheme must be one of"),
    (f"redis://u:{SECRET}@h:port/0", "port of h must be a number"),
    (f"redis://u:{SECRET}@h:70000/0", "out of range"),
    (f"redis://u:{SECRET}@h/zero", "database must be a number"),
    (f"redis://u:{SECRET}@a,b/0", "several hosts are a Sentinel URL"),
    (f"redis+sentinel://u:{SECRET}@a:1,b:2", "names the master's service"),
    (f"redis+sentinel://u:{SECRET}@a:1/m/0/x", "unexpected path"),
    (f"redis://u:{SECRET}@h/0?ssl_cert_reqs=none", "query parameters are not taken"),
    (f"redis://u:{SECRET}@:6379/0", "host is missing"),
    (f"redis+cluster://u:{SECRET}@a:1,b:2/3", "a Redis Cluster has database 0 only, not 3"),
    (f"rediss+cluster://u:{SECRET}@a:1/0/x", "unexpected path"),
])
def test_a_bad_url_is_a_config_error_that_names_it_with_the_password_masked(url, says):
    with pytest.raises(ConfigError) as caught:
        MeshSettings.from_env({"MESH_REDIS_URL": url})
    assert says in str(caught.value)
    assert "u:***@" in str(caught.value)
    assert SECRET not in str(caught.value)
    with pytest.raises(ValueError) as direct:  # built directly, pydantic's own error text hides the input
        MeshSettings(redis_url=url)
    assert SECRET not in str(direct.value)


def test_masked_url_hides_only_the_password():
    assert masked_url(f"redis://mesh:{SECRET}@h:1/0") == "redis://mesh:***@h:1/0"
    assert masked_url(f"redis://:{SECRET}@h:1/0") == "redis://:***@h:1/0"
    assert masked_url(f"rediss://{SECRET}@h:1/0") == "rediss://***@h:1/0"
    assert masked_url(f"redis+sentinel://:{SECRET}@a:1,b:2/m/0") == "redis+sentinel://:***@a:1,b:2/m/0"
    assert masked_url("redis://h:1/0") == "redis://h:1/0"
    assert masked_url(f"rediss+cluster://mesh:{SECRET}@a:1,b:2/") == "rediss+cluster://mesh:***@a:1,b:2/"


def test_a_cluster_url_says_so_and_which_seeds():
    address = parse_url("rediss+cluster://a:1,[::1]:2/")
    assert (address.cluster, address.tls, address.sentinel) == (True, True, False)
    assert not parse_url("redis+cluster://a:1/").tls
    assert configured(MeshSettings(redis_url=f"redis+cluster://:{SECRET}@a:1,[::1]:2/")) == {
        "cluster": ["a:1", "[::1]:2"], "db": 0, "tls": False}


def test_tls_files_are_refused_without_rediss_missing_or_half_given(tmp_path):
    pem = tmp_path / "ca.pem"
    pem.write_text("-")
    with pytest.raises(ConfigError, match="MESH_REDIS_CA_FILE applies to TLS only"):
        MeshSettings.from_env({"MESH_REDIS_URL": "redis://h/0", "MESH_REDIS_CA_FILE": str(pem)})
    with pytest.raises(ConfigError, match="MESH_REDIS_CA_FILE: no such file"):
        MeshSettings.from_env({"MESH_REDIS_URL": "rediss://h/0", "MESH_REDIS_CA_FILE": str(tmp_path / "no")})
    with pytest.raises(ConfigError, match="go together"):
        MeshSettings.from_env({"MESH_REDIS_URL": "rediss://h/0", "MESH_REDIS_CERT_FILE": str(pem)})
    s = MeshSettings.from_env({"MESH_REDIS_URL": "rediss://h/0", "MESH_REDIS_CA_FILE": str(pem)})
    assert s.redis_ca_file == str(pem)


def test_clients_of_each_form_carry_credentials_tls_and_the_retry_policy(tmp_path):
    pem = tmp_path / "ca.pem"
    pem.write_text("-")
    plain = connect(MeshSettings(redis_url=f"redis://mesh:{SECRET}@h:7/3"), retries=False)
    kw = plain.connection_pool.connection_kwargs
    assert (kw["host"], kw["port"], kw["db"], kw["username"], kw["password"]) == ("h", 7, 3, "mesh", SECRET)
    assert kw["retry"].get_retries() == 0
    assert connect(MeshSettings(redis_url="redis://h/0")).connection_pool.connection_kwargs["retry"].get_retries() > 0

    tls = connect(MeshSettings(redis_url="rediss://h:7/0", redis_ca_file=str(pem)))
    assert tls.connection_pool.connection_class is redis.SSLConnection
    assert tls.connection_pool.connection_kwargs["ssl_ca_certs"] == str(pem)

    sentinel = connect(MeshSettings(redis_url=f"redis+sentinel://:{SECRET}@a:1,b:2/mymaster/5"))
    pool = sentinel.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "mymaster"
    assert (pool.connection_kwargs["db"], pool.connection_kwargs["password"]) == (5, SECRET)
    assert configured(sentinel_settings := MeshSettings(redis_url="redis+sentinel://a:1,b:2/mymaster/5")) == {
        "sentinel": "mymaster", "sentinels": ["a:1", "b:2"], "db": 5, "tls": False}
    assert SECRET not in repr(configured(sentinel_settings))


def _packed(client: redis.Redis, *args: object) -> bytes:
    conn = client.connection_pool.make_connection()
    return b"".join(conn.pack_command(*args))


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://h:6380/1", "redis+sentinel://a/mymaster"])
def test_commands_are_packed_whole_as_redis_py_would_pack_them(url, monkeypatch):
    """A command of str, bytes, int and float arguments goes to hiredis in one call (no argument
    encoded in Python), and its bytes are redis-py's; a name of several words is split as redis-py
    splits it, and what redis-py refuses is still refused."""
    client, plain = connect(MeshSettings(redis_url=url)), redis.Redis()
    args = ("EVALSHA", "a" * 40, 0, "clé", b"\x00\xff", 1796564011.687, 1e16, -0.0, 2**70, 7, *["x"] * 50)
    expected = _packed(plain, *args)
    encoded = []
    encode = redis.connection.Encoder.encode
    monkeypatch.setattr(redis.connection.Encoder, "encode", lambda self, v: encoded.append(v) or encode(self, v))
    assert _packed(client, *args) == expected
    assert encoded == []
    assert _packed(client, "CLIENT SETNAME", "w") == b"*3\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n$1\r\nw\r\n"
    assert _packed(client, "SET", "k", bytearray(b"v")) == _packed(plain, "SET", "k", bytearray(b"v"))
    for refused in (True, None):
        with pytest.raises(redis.DataError):
            _packed(client, "SET", "k", refused)
