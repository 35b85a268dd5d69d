#!/usr/bin/env python3
"""Runs agentmesh's clients in other languages against a real suite.

Starts `agentmesh up` on free loopback ports (addresses read from its JSON
log), then:

1. the Python client (stubs generated from proto/ with grpcio-tools),
2. the Node.js client (@grpc/grpc-js + @grpc/proto-loader),
3. every command of the README's "Calling agentmesh" section (grpcurl and
   `buf curl`), with the default ports replaced by the real ones,
4. `promtool check metrics` on the suite's /metrics,
5. a real Prometheus scraping the suite,
6. TLS and mTLS with third-party clients: certificates made with openssl,
   `agentmesh serve config` requiring client certificates, grpcurl (Go)
   and grpcio (Python) with and without one, and `agentmesh health` over
   https,

then stops the suite with SIGTERM and expects a clean exit. Any failure
exits non-zero. .ci/run calls it with the tools it installed:

    python3 tests/clients/run.py --binary target/debug/agentmesh \\
        --python VENV/bin/python --node-modules DIR/node_modules \\
        --grpcurl PATH --buf PATH --promtool PATH --prometheus PATH
"""

import argparse
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLIENTS = os.path.join(ROOT, "tests", "clients")

# Default gRPC port of each service, as the README writes them.
SERVICES = {
    "gateway": (50051, "agentmesh.gateway.v1.GatewayService"),
    "agent": (50052, "agentmesh.agent.v1.AgentService"),
    "config": (50053, "agentmesh.config.v1.ConfigService"),
    "audit": (50054, "agentmesh.audit.v1.AuditService"),
    "cache": (50055, "agentmesh.cache.v1.CacheService"),
}


def step(title):
    print(f"\n-- {title}", flush=True)


def run(command, **kwargs):
    """Runs a command, echoing it; raises on a non-zero exit."""
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, timeout=kwargs.pop("timeout", 120), **kwargs)


def clean_env():
    """The environment without agentmesh settings or OpenTelemetry export:
    the suite runs on its embedded defaults."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AGENTMESH_", "OTEL_", "DEFAULT_", "OPENAI_"))
    }


class Suite:
    """`agentmesh up` on free ports."""

    def __init__(self, binary, data_dir):
        args = [binary, "up", "--data-dir", data_dir, "--log-format", "json"]
        for flag in ("gateway", "agent", "config", "audit", "cache", "admin"):
            args += [f"--{flag}-port", "0"]
        env = clean_env()
        env["AGENTMESH_LOG"] = "info"
        self.process = subprocess.Popen(
            args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self.grpc, self.admin = {}, None
        deadline = time.monotonic() + 60
        while len(self.grpc) < len(SERVICES) or self.admin is None:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise SystemExit("agentmesh up did not log its addresses within 60 s")
            try:
                fields = json.loads(line).get("fields", {})
            except json.JSONDecodeError:
                continue
            message, address = fields.get("message", ""), fields.get("address")
            if message.startswith("admin endpoint listening"):
                self.admin = address
            elif message.startswith("grpc server listening"):
                for name, (_, full) in SERVICES.items():
                    if full in fields.get("services", ""):
                        self.grpc[name] = address
        print(f"suite: {self.grpc}, admin {self.admin}", flush=True)

    def _drain(self):
        for line in self.process.stderr:
            self.lines.put(line)

    def stop(self):
        """SIGTERM, then the exit status (0 after a clean drain)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def readme_commands():
    """The shell blocks of the README's "Calling agentmesh" section."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as file:
        text = file.read()
    section = re.search(r"^## Calling agentmesh\n(.*?)(?=^## )", text, re.S | re.M)
    if not section:
        raise SystemExit('README.md has no "## Calling agentmesh" section')
    blocks = re.findall(r"^```sh\n(.*?)^```", section.group(1), re.S | re.M)
    if not blocks:
        raise SystemExit('the "Calling agentmesh" section has no sh blocks')
    return "\n".join(blocks)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def check_prometheus_scrapes(prometheus, admin, workdir):
    """Runs Prometheus against the suite until it reports the target up and
    has stored one of the suite's own metrics."""
    port = free_port()
    config = os.path.join(workdir, "prometheus.yml")
    with open(config, "w", encoding="utf-8") as file:
        file.write(
            "global:\n  scrape_interval: 1s\n"
            "scrape_configs:\n  - job_name: agentmesh\n"
            f"    static_configs:\n      - targets: ['{admin}']\n"
        )
    process = subprocess.Popen(
        [prometheus, f"--config.file={config}", f"--storage.tsdb.path={workdir}/tsdb",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        query = urllib.parse.quote('sum(grpc_server_handled_total{job="agentmesh"})')
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                up = json.loads(http_get(f"http://127.0.0.1:{port}/api/v1/query?query=up"))
                handled = json.loads(http_get(f"http://127.0.0.1:{port}/api/v1/query?query={query}"))
                up_values = [r["value"][1] for r in up["data"]["result"]]
                if up_values == ["1"] and handled["data"]["result"]:
                    total = handled["data"]["result"][0]["value"][1]
                    print(f"prometheus: target up, {total} gRPC calls scraped", flush=True)
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise SystemExit("prometheus did not scrape the suite within 60 s")
    finally:
        process.terminate()
        process.wait(timeout=30)


TLS_HEALTH_CHECK = """
import sys
import grpc
target, ca, cert, key = sys.argv[1:5]
credentials = grpc.ssl_channel_credentials(
    open(ca, "rb").read(),
    open(key, "rb").read() if key else None,
    open(cert, "rb").read() if cert else None,
)
with grpc.secure_channel(target, credentials) as channel:
    check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                request_serializer=lambda request: request,
                                response_deserializer=lambda response: response)
    try:
        answer = check(b"", timeout=10)
    except grpc.RpcError as error:
        print(f"refused: {error.code()}")
        sys.exit(3)
    # HealthCheckResponse{status: SERVING} is field 1 = 1.
    print("SERVING" if answer == b"\\x08\\x01" else f"not serving: {answer!r}")
    sys.exit(0 if answer == b"\\x08\\x01" else 1)
"""


def make_certificates(folder):
    """A CA, a server certificate for localhost/127.0.0.1 and a client
    certificate, with openssl as an operator would."""
    def openssl(*arguments):
        subprocess.run(["openssl", *arguments], check=True, cwd=folder, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", "/CN=agentmesh ci ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, extensions in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        with open(os.path.join(folder, f"{name}.ext"), "w", encoding="utf-8") as file:
            file.write(extensions)
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext")
    return {name: os.path.join(folder, name) for name in
            ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def check_tls(binary, python, grpcurl, workdir):
    """mTLS on a listener, called by grpcurl, grpcio and `agentmesh health`."""
    folder = os.path.join(workdir, "tls")
    os.makedirs(folder)
    files = make_certificates(folder)
    env = clean_env()
    env.update({
        "AGENTMESH_LOG": "info",
        "AGENTMESH_SERVER__TLS__CERT_FILE": files["server.crt"],
        "AGENTMESH_SERVER__TLS__KEY_FILE": files["server.key"],
        "AGENTMESH_SERVER__TLS__CLIENT_CA_FILE": files["ca.crt"],
    })
    port = free_port()
    process = subprocess.Popen(
        [binary, "serve", "config", "--data-dir", os.path.join(workdir, "tls-data"),
         "--config-port", str(port), "--admin-port", "0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = f"localhost:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit("agentmesh serve config with TLS did not start")
                time.sleep(0.2)
        health = ["-d", "{}", target, "grpc.health.v1.Health/Check"]
        run([grpcurl, "-cacert", files["ca.crt"], "-cert", files["client.crt"],
             "-key", files["client.key"], *health])
        refused = subprocess.run([grpcurl, "-cacert", files["ca.crt"], *health],
                                 capture_output=True, text=True, timeout=60)
        if refused.returncode == 0:
            raise SystemExit("grpcurl without a client certificate was let in")
        print(f"grpcurl without a client certificate: refused ({refused.stderr.strip()[:120]})")
        run([python, "-c", TLS_HEALTH_CHECK, target, files["ca.crt"], files["client.crt"],
             files["client.key"]])
        without = subprocess.run([python, "-c", TLS_HEALTH_CHECK, target, files["ca.crt"], "", ""],
                                 capture_output=True, text=True, timeout=60)
        if without.returncode != 3:
            raise SystemExit(f"grpcio without a client certificate: {without.stdout} {without.stderr}")
        print("grpcio without a client certificate: refused")
        health_env = clean_env()
        health_env.update({
            "AGENTMESH_ENDPOINTS__TLS__CA_FILE": files["ca.crt"],
            "AGENTMESH_ENDPOINTS__TLS__CERT_FILE": files["client.crt"],
            "AGENTMESH_ENDPOINTS__TLS__KEY_FILE": files["client.key"],
        })
        run([binary, "health", "--addr", f"https://{target}"], env=health_env)
    finally:
        process.terminate()
        process.wait(timeout=30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--binary", required=True)
    parser.add_argument("--python", required=True, help="python with grpcio and grpcio-tools")
    parser.add_argument("--node-modules", required=True, help="node_modules with @grpc/grpc-js and @grpc/proto-loader")
    parser.add_argument("--grpcurl", required=True)
    parser.add_argument("--buf", required=True)
    parser.add_argument("--promtool", required=True)
    parser.add_argument("--prometheus", help="prometheus binary; the scrape check is skipped without it")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="agentmesh-clients-")
    suite = Suite(os.path.abspath(args.binary), os.path.join(workdir, "data"))
    failed = False
    try:
        gateway = suite.grpc["gateway"]

        step("python client (grpcio-tools stubs from proto/)")
        generated = os.path.join(CLIENTS, "python", "generated")
        shutil.rmtree(generated, ignore_errors=True)
        os.makedirs(generated)
        protos = sorted(
            os.path.relpath(os.path.join(folder, name), os.path.join(ROOT, "proto"))
            for folder, _, names in os.walk(os.path.join(ROOT, "proto"))
            for name in names if name.endswith(".proto")
        )
        run([args.python, "-m", "grpc_tools.protoc", "-I", os.path.join(ROOT, "proto"),
             f"--python_out={generated}", f"--grpc_python_out={generated}", *protos])
        run([args.python, os.path.join(CLIENTS, "python", "client.py"), gateway])

        step("node client (@grpc/grpc-js + @grpc/proto-loader)")
        node_env = dict(os.environ, NODE_PATH=os.path.abspath(args.node_modules))
        run(["node", os.path.join(CLIENTS, "node", "client.js"), gateway], env=node_env)

        step('README "Calling agentmesh" commands')
        script = readme_commands()
        for name, (port, _) in SERVICES.items():
            script = script.replace(f"127.0.0.1:{port}", suite.grpc[name])
        tools = os.path.join(workdir, "bin")
        os.makedirs(tools)
        for name, path in (("grpcurl", args.grpcurl), ("buf", args.buf)):
            os.symlink(os.path.abspath(path), os.path.join(tools, name))
        env = dict(clean_env(), PATH=tools + os.pathsep + os.environ["PATH"])
        print(script, flush=True)
        subprocess.run(["bash", "-euo", "pipefail", "-x", "-c", script], check=True, cwd=ROOT,
                       env=env, timeout=120)

        step("more traffic, so /metrics has every service's metrics")
        for service, rpc in (("cache", "cache.get"), ("audit", "audit.append"), ("config", "config.get-effective")):
            run([os.path.abspath(args.binary), "bench", "--target", suite.grpc[service], "--rpc", rpc,
                 "-c", "2", "-n", "20"], env=clean_env(), stdout=subprocess.DEVNULL)
        run([os.path.abspath(args.binary), "audit", "verify", "--target", suite.grpc["audit"]],
            env=clean_env(), stdout=subprocess.DEVNULL)

        step("promtool check metrics on /metrics")
        metrics = http_get(f"http://{suite.admin}/metrics")
        families = len(re.findall(r"^# TYPE ", metrics, re.M))
        subprocess.run([args.promtool, "check", "metrics"], input=metrics, text=True, check=True,
                       timeout=60)
        print(f"promtool: {families} metric families, no problems", flush=True)

        if args.prometheus:
            step("prometheus scrapes the suite")
            check_prometheus_scrapes(args.prometheus, suite.admin, workdir)

        step("TLS and mTLS: grpcurl, grpcio and agentmesh health against openssl certificates")
        check_tls(os.path.abspath(args.binary), args.python, args.grpcurl, workdir)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        print(f"FAILED: {error}", file=sys.stderr, flush=True)
        failed = True
    finally:
        status = suite.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if status != 0:
        print(f"FAILED: agentmesh up exited with {status} after SIGTERM", file=sys.stderr)
        failed = True
    if failed:
        sys.exit(1)
    print("\npolyglot clients, README commands and metrics: ok", flush=True)


if __name__ == "__main__":
    main()
