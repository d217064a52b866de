"""`make demo`: a Consul dev agent, three demo backends and Ferryman, all on loopback; Ctrl-C stops them.

Every process is started here and stopped here by its PID. Ports: Ferryman on 8080 (admin 9919) and Consul
on 8500 when free, otherwise free ports are chosen and printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def port_or_free(preferred: int = 0) -> int:
    """`preferred` when it is free on 127.0.0.1, otherwise (or when 0) a port the kernel picks."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(url: str, what: str, procs: list[tuple[str, subprocess.Popen[bytes]]], work: Path,
             timeout: float = 60, check=lambda body: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in procs:
            if proc.poll() is not None:
                log = (work / f"{name}.log").read_text(errors="replace")[-2000:]
                raise SystemExit(f"demo: {name} exited with {proc.returncode}:\n{log}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if check(resp.read()):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"demo: {what} did not come up within {timeout:.0f}s ({url})")


def self_signed(work: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for `name` (and 127.0.0.1), valid a week, for the demo's HTTPS listener."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = work / "demo-cert.pem", work / "demo-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def static_config(backends: list[tuple[str, int, list[str]]], ports: list[tuple[str, int]]) -> str:
    """The demo's services as a static file for Ferryman (`static_file`): the same routes, no Consul."""
    lines = []
    for service in dict.fromkeys(name for name, _, _ in backends):
        tags = next(tags for name, _, tags in backends if name == service)
        routes = ", ".join(json.dumps(tag.removeprefix("urlprefix-")) for tag in tags)
        instances = ", ".join(json.dumps(f"127.0.0.1:{port}") for name, port in ports if name == service)
        lines += ["[[services]]", f"name = {json.dumps(service)}", f"routes = [{routes}]",
                  f"instances = [{instances}]", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--consul-bin", default=shutil.which("consul") or str(REPO / ".venv/bin/consul"))
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--admin-port", type=int, default=9919)
    parser.add_argument("--tls-port", type=int, default=8443)
    parser.add_argument("--static", action="store_true",
                        help="no Consul: Ferryman routes from a static file (also the fallback without a binary)")
    args = parser.parse_args()
    static = args.static or not Path(args.consul_bin).is_file()
    if static and not args.static:
        print("demo: no Consul binary found: running on Ferryman's static provider instead "
              "(install Consul so `consul` is on PATH for the full demo)")

    work = Path(tempfile.mkdtemp(prefix="ferryman-demo-"))
    consul_port = port_or_free(8500)
    proxy_port, admin_port = port_or_free(args.port), port_or_free(args.admin_port)
    tls_port = port_or_free(args.tls_port)
    cert, key = self_signed(work, "localhost")
    consul_addr = f"127.0.0.1:{consul_port}"
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(name: str, cmd: list[str]) -> None:
        log = open(work / f"{name}.log", "wb")
        procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)))
        log.close()

    def stop_all(*_: object) -> None:
        # A second Ctrl-C or SIGTERM (make passes its own on) must not cut the stopping short and leave processes.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for _, proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in reversed(procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                print(f"demo: {name} (pid {proc.pid}) did not stop in time; killing it")
                proc.kill()
        procs.clear()

    try:
        if not static:
            ports = [port_or_free() for _ in range(3)]
            spawn("consul", [args.consul_bin, "agent", "-dev", "-bind", "127.0.0.1", "-client", "127.0.0.1",
                             "-http-port", str(consul_port), "-dns-port", "-1", "-grpc-port", "-1",
                             "-serf-lan-port", str(ports[0]), "-serf-wan-port", str(ports[1]),
                             "-server-port", str(ports[2])])
            wait_for(f"http://{consul_addr}/v1/status/leader", "Consul", procs, work,
                     check=lambda b: len(b.strip()) > 2)

        py = sys.executable
        backends = [
            ("web", 0, ["urlprefix-/ lb=round_robin"]),
            ("web", 0, ["urlprefix-/ lb=round_robin"]),
            ("api", 0, ["urlprefix-/api strip=/api", "urlprefix-api.localhost/"]),
        ]
        backend_ports = []
        for i, (service, _, tags) in enumerate(backends):
            port = port_or_free(18081 + i)
            backend_ports.append((service, port))
            tag_args = [a for t in tags for a in ("--tag", t)]
            spawn(f"{service}-{port}", [py, "-m", "demo.backend", "--service", service, "--id",
                                        f"{service}-{port}", "--port", str(port), "--consul", consul_addr,
                                        *(("--check", "none") if static else ()), *tag_args])
        source = ["--consul-addr", consul_addr]
        if static:
            static_file = work / "static.toml"
            static_file.write_text(static_config(backends, backend_ports))
            source = ["--static-file", str(static_file)]
        spawn("ferryman", [str(Path(py).parent / "ferryman"), "--listen", f"127.0.0.1:{proxy_port}",
                           "--admin-listen", f"127.0.0.1:{admin_port}", *source,
                           "--log-format", "console", "--workers", "1",
                           "--tls-listen", f"127.0.0.1:{tls_port}", "--tls-certs", f"{cert}:{key}"])

        def all_routed(body: bytes) -> bool:
            routes = json.loads(body)["routes"]
            return sum(len(r["instances"]) for r in routes) >= 4

        wait_for(f"http://127.0.0.1:{admin_port}/api/routes", "Ferryman with every demo route", procs, work,
                 check=all_routed)
        web_a = backend_ports[0][1]
        source_line = (f"Static file        {work / 'static.toml'}   (no Consul: edit it, Ferryman re-reads it)"
                       if static else f"Consul UI/API      http://{consul_addr}/ui/")
        fail_over = (f"""Take a backend out (in another terminal):
  while true; do curl -s http://127.0.0.1:{proxy_port}/ | grep -o '"instance": "[^"]*"'; sleep 0.3; done
  edit {work / 'static.toml'}: remove "127.0.0.1:{web_a}" from web's instances; Ferryman follows within 2 s"""
                     if static else f"""Watch a backend fail over (in another terminal):
  while true; do curl -s http://127.0.0.1:{proxy_port}/ | grep -o '"instance": "[^"]*"'; sleep 0.3; done
  curl -X POST http://127.0.0.1:{web_a}/admin/fail      # its Consul TTL check turns critical: out of the pool
  curl -X POST http://127.0.0.1:{web_a}/admin/recover   # passing again: back in""")
        print(f"""
Ferryman demo is running (logs in {work}).

  {source_line}
  Proxy              http://127.0.0.1:{proxy_port}/              round robin over two web instances
                     http://127.0.0.1:{proxy_port}/api/hello     service api, /api stripped
                     curl -H 'Host: api.localhost' http://127.0.0.1:{proxy_port}/hello
                     http://127.0.0.1:{proxy_port}/stream?chunks=5&delay=0.5   a streamed response
  HTTPS              https://localhost:{tls_port}/             a self-signed certificate for localhost:
                     curl --cacert {cert} https://localhost:{tls_port}/api/hello
  Status page        http://127.0.0.1:{admin_port}/              routes, instances, discovery (refreshes itself)
  Routing table      http://127.0.0.1:{admin_port}/api/routes
  Metrics            http://127.0.0.1:{admin_port}/metrics
  Readiness          http://127.0.0.1:{admin_port}/ready

{fail_over}

Ctrl-C stops everything this demo started.
""", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while all(proc.poll() is None for _, proc in procs):
            time.sleep(0.5)
        dead = [f"{name} (exit {proc.returncode})" for name, proc in procs if proc.poll() is not None]
        print(f"demo: {', '.join(dead)} stopped; see the logs in {work}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ndemo: stopping")
    finally:
        stop_all()
        if os.environ.get("DEMO_KEEP_LOGS") is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
