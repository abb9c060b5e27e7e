"""The local real stack: one Apache Kafka broker (KRaft) and one redis-server.

``streamrec up`` resolves the pinned Kafka release from Maven Central with ``mvn``
(cached in the state dir after the first run), formats the KRaft storage once,
starts the broker on the machine's Java and redis-server from PATH, and waits until
each answers (a Kafka metadata request, a Redis PING). ``down`` stops exactly the
processes it started (pid files); ``status`` reports both.

If the configured bootstrap servers or Redis URL already answer, nothing is
started for them: users with their own cluster just point the settings at it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from string import Template

from streamrec.settings import Settings

_QUIET = logging.getLogger("devstack.stack.probe")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


class StackError(RuntimeError):
    """A local service could not be started; the message says what to do."""


@dataclass
class ServiceStatus:
    name: str
    address: str
    healthy: bool
    pid: int | None
    managed: bool  # started by streamrec (pid file) rather than external
    log: Path | None
    detail: str = ""


def kafka_version(deploy_dir: Path) -> str:
    m = re.search(r"<kafka.version>([^<]+)</kafka.version>", (deploy_dir / "pom.xml").read_text())
    if not m:
        raise StackError(f"{deploy_dir / 'pom.xml'} has no <kafka.version>")
    return m.group(1)


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return True


def _free_port_for_tests() -> int:
    """A free TCP port on loopback (for private stacks in tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kafka_healthy(settings: Settings, timeout: float = 3.0) -> tuple[bool, str]:
    """A real metadata request through confluent-kafka's admin client."""
    from confluent_kafka.admin import AdminClient

    conf = settings.kafka.librdkafka_config()
    conf["socket.connection.setup.timeout.ms"] = int(timeout * 1000)
    conf["logger"] = _QUIET  # a probe of a broker that may be down: no librdkafka log spam
    try:
        md = AdminClient(conf).list_topics(timeout=timeout)
    except Exception as exc:  # KafkaException: no broker answered
        return False, str(exc)
    return True, f"{len(md.brokers)} broker(s), {len(md.topics)} topic(s)"


def redis_healthy(settings: Settings, timeout: float = 2.0) -> tuple[bool, str]:
    try:
        client = settings.redis.client(socket_timeout=timeout, socket_connect_timeout=timeout)
        client.ping()
        if settings.redis.cluster:
            state = client.cluster_info()  # RedisCluster: a node's view of the cluster
            if state.get("cluster_state") != "ok":
                return False, f"cluster state {state.get('cluster_state')}"
            return True, f"redis cluster, {state.get('cluster_known_nodes')} nodes, slots ok"
        info = client.info("server")
        return True, f"redis {info.get('redis_version')}"
    except Exception as exc:
        return False, str(exc)


class LocalStack:
    """Start, stop and inspect the local Kafka + Redis."""

    def __init__(self, settings: Settings, *, redis_profile: str = "test") -> None:
        self.s = settings
        self.state = settings.state_dir.resolve()
        self.deploy = settings.deploy_dir
        self.redis_profile = redis_profile
        self.version = kafka_version(self.deploy)
        # A SASL_SSL broker keeps its own data: its SCRAM users are written when it is formatted.
        self.kafka_dir = self.state / ("kafka-sasl" if self.secure_kafka else "kafka")
        self.libs_dir = self.state / f"kafka-libs-{self.version}"
        self.redis_dir = self.state / "redis"

    # -- security ------------------------------------------------------------------------
    @property
    def secure_kafka(self) -> bool:
        """The local broker listens with SASL_SSL (settings ``kafka.security_protocol``)."""
        proto = self.s.kafka.security_protocol.value
        if proto == "PLAINTEXT":
            return False
        if proto != "SASL_SSL" or not self.s.kafka.sasl_mechanism.value.startswith("SCRAM"):
            raise StackError(
                "the local broker runs PLAINTEXT or SASL_SSL with SCRAM-SHA-512/256; set "
                "STREAMREC_KAFKA_SECURITY_PROTOCOL and STREAMREC_KAFKA_SASL_MECHANISM accordingly"
            )
        if not self.s.kafka.sasl_username or self.s.kafka.sasl_password is None:
            raise StackError(
                "a SASL_SSL broker needs STREAMREC_KAFKA_SASL_USERNAME and STREAMREC_KAFKA_SASL_PASSWORD"
            )
        return True

    def certs(self):  # -> devstack.tls.Certs
        """The local CA and server certificate, in the folder of the configured CA file."""
        from devstack.tls import CertError, ensure_certs

        ca = self.s.kafka.ssl_cafile or self.s.redis.ssl_ca_certs
        folder = ca.parent if ca is not None else self.state / "tls"
        try:
            return ensure_certs(folder)
        except CertError as exc:
            raise StackError(str(exc)) from exc

    # -- paths ---------------------------------------------------------------------------
    @property
    def kafka_pidfile(self) -> Path:
        return self.kafka_dir / "kafka.pid"

    @property
    def kafka_log(self) -> Path:
        return self.kafka_dir / "logs" / "server.log"

    @property
    def kafka_stdout(self) -> Path:
        return self.kafka_dir / "logs" / "stdout.log"

    @property
    def redis_pidfile(self) -> Path:
        return self.redis_dir / "redis.pid"

    @property
    def redis_log(self) -> Path:
        return self.redis_dir / "redis.log"

    def pids(self) -> dict[str, int]:
        """The running broker's and Redis server's process ids ("kafka", "redis"), those running."""
        found = {"kafka": self._read_pid(self.kafka_pidfile), "redis": self._read_pid(self.redis_pidfile)}
        return {name: pid for name, pid in found.items() if pid is not None}

    def _read_pid(self, pidfile: Path) -> int | None:
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    # -- Kafka ---------------------------------------------------------------------------
    def resolve_kafka(self) -> Path:
        """Copy the broker's jars from Maven Central (through ~/.m2) into the state dir, once."""
        marker = self.libs_dir / ".complete"
        if marker.exists():
            return self.libs_dir
        if shutil.which("mvn") is None:
            raise StackError(
                "mvn not found: install Maven (apt-get install -y maven) to resolve the Kafka jars"
            )
        tmp = self.libs_dir.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(self.deploy / "pom.xml"),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}",
            "-DincludeScope=runtime",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise StackError(
                f"mvn could not resolve Kafka {self.version}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
        shutil.rmtree(self.libs_dir, ignore_errors=True)
        tmp.rename(self.libs_dir)
        marker.write_text(self.version)
        return self.libs_dir

    def _java(self) -> str:
        java = shutil.which("java")
        if java is None:
            raise StackError(
                "java not found: install a Java 17 runtime (apt-get install -y openjdk-17-jre-headless)"
            )
        return java

    def _render_server_properties(self) -> Path:
        host, port = self.s.kafka.first_host_port
        text = Template((self.deploy / "server.properties").read_text()).substitute(
            host=host,
            port=port,
            controller_port=self.s.kafka.controller_port,
            data_dir=self.kafka_dir / "data",
        )
        if self.secure_kafka:
            text = self._secure_properties(text, host, port)
        out = self.kafka_dir / "server.properties"
        out.write_text(text)
        return out

    def _secure_properties(self, text: str, host: str, port: int) -> str:
        """Clients on SASL_SSL (SCRAM, the local CA's certificate); the broker talks to itself
        on a loopback PLAINTEXT listener at ``kafka.controller_port + 1``."""
        certs = self.certs()
        internal = self.s.kafka.controller_port + 1
        cport = self.s.kafka.controller_port
        mech = self.s.kafka.sasl_mechanism.value
        over = {
            "listeners": f"SASL_SSL://{host}:{port},BROKER://{host}:{internal},CONTROLLER://{host}:{cport}",
            "advertised.listeners": f"SASL_SSL://{host}:{port},BROKER://{host}:{internal}",
            "inter.broker.listener.name": "BROKER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,BROKER:PLAINTEXT,SASL_SSL:SASL_SSL",
            "sasl.enabled.mechanisms": mech,
            f"listener.name.sasl_ssl.{mech.lower()}.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "listener.name.sasl_ssl.ssl.keystore.type": "PEM",
            "listener.name.sasl_ssl.ssl.keystore.location": str(certs.pem),
        }  # fmt: skip
        lines = [ln for ln in text.splitlines() if ln.split("=", 1)[0].strip() not in over]
        return "\n".join([*lines, *(f"{k}={v}" for k, v in over.items())]) + "\n"

    def _scram_args(self) -> list[str]:
        """The SCRAM user of a SASL_SSL broker, written into its metadata when it is formatted."""
        if not self.secure_kafka:
            return []
        k = self.s.kafka
        pw = k.sasl_password.get_secret_value() if k.sasl_password else ""
        if '"' in pw or '"' in (k.sasl_username or ""):
            raise StackError("the local SCRAM user name and password cannot contain '\"'")
        return ["--add-scram", f'{k.sasl_mechanism.value}=[name="{k.sasl_username}",password="{pw}"]']

    def jvm_options(self) -> list[str]:
        """Heap, collector and JIT of the local broker's JVM (``kafka.heap``, ``kafka.full_jit``)."""
        k = self.s.kafka
        jit = [] if k.full_jit else ["-XX:TieredStopAtLevel=1"]  # C1 only: a cheaper start, slower code
        return [f"-Xmx{k.heap}", f"-Xms{k.heap}", "-XX:+UseG1GC", *jit]

    def start_kafka(self, timeout: float = 90.0) -> ServiceStatus:
        host, port = self.s.kafka.first_host_port
        pid = self._read_pid(self.kafka_pidfile)
        if pid is None:
            ok, _ = kafka_healthy(self.s, timeout=2.0)
            if ok:
                return ServiceStatus(
                    "kafka", self.s.kafka.bootstrap_servers, True, None, False, None, "external"
                )
            if _port_open(host, port):
                raise StackError(
                    f"port {host}:{port} is taken by something that is not a Kafka broker; "
                    "set STREAMREC_KAFKA_BOOTSTRAP_SERVERS to a free port"
                )
            libs = self.resolve_kafka()
            java = self._java()
            (self.kafka_dir / "logs").mkdir(parents=True, exist_ok=True)
            props = self._render_server_properties()
            cp = f"{libs}/*"
            if not (self.kafka_dir / "data" / "meta.properties").exists():
                cluster_id = uuid.uuid4().hex[:22]
                fmt = subprocess.run(
                    [
                        java,
                        "-cp",
                        cp,
                        "kafka.tools.StorageTool",
                        "format",
                        "-t",
                        cluster_id,
                        "-c",
                        str(props),
                        *self._scram_args(),
                    ],
                    capture_output=True,
                    text=True,
                )
                if fmt.returncode != 0:
                    pw = self.s.kafka.sasl_password
                    said = fmt.stdout + fmt.stderr
                    if pw is not None:
                        said = said.replace(pw.get_secret_value(), "***")
                    raise StackError(f"formatting KRaft storage failed:\n{said}")
            logs = self.kafka_dir / "logs"
            cmd = [
                java,
                *self.jvm_options(),
                "-Djava.awt.headless=true",
                f"-Dkafka.logs.dir={logs}",
                f"-Dlog4j2.configurationFile={self.deploy / 'log4j2.yaml'}",
                "-cp",
                cp,
                "kafka.Kafka",
                str(props),
            ]
            with open(self.kafka_stdout, "ab") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            self.kafka_pidfile.write_text(str(proc.pid))
            pid = proc.pid
        deadline = time.monotonic() + timeout
        detail = ""
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                raise StackError(
                    f"Kafka exited during start-up; see {self.kafka_log} and {self.kafka_stdout}"
                )
            ok, detail = kafka_healthy(self.s, timeout=min(2.0, max(0.2, deadline - time.monotonic())))
            if ok:
                return ServiceStatus(
                    "kafka", self.s.kafka.bootstrap_servers, True, pid, True, self.kafka_log, detail
                )
            time.sleep(0.5)
        raise StackError(
            f"Kafka did not answer a metadata request within {timeout:.0f}s ({detail}); see {self.kafka_log}"
        )

    # -- Redis ---------------------------------------------------------------------------
    def start_redis(self, timeout: float = 20.0) -> ServiceStatus:
        if self.s.redis.cluster:
            return self.start_redis_cluster(timeout)
        host, port = self.s.redis.host_port
        pid = self._read_pid(self.redis_pidfile)
        if pid is None:
            ok, detail = redis_healthy(self.s, timeout=1.0)
            if ok:
                return ServiceStatus(
                    "redis", self.s.redis.url, True, None, False, None, f"external, {detail}"
                )
            if _port_open(host, port):
                raise StackError(
                    f"port {host}:{port} is taken by something that does not answer Redis PING with these "
                    "credentials; set STREAMREC_REDIS_URL (and STREAMREC_REDIS_PASSWORD)"
                )
            server = shutil.which("redis-server")
            if server is None:
                raise StackError(
                    "redis-server not found on PATH: install it with `apt-get install -y redis-server`"
                )
            self.redis_dir.mkdir(parents=True, exist_ok=True)
            conf = self.deploy / f"redis-{self.redis_profile}.conf"
            cmd = [
                server,
                str(conf),
                "--port",
                str(port),
                "--bind",
                host,
                "--dir",
                str(self.redis_dir),
                "--logfile",
                str(self.redis_log),
                "--pidfile",
                str(self.redis_dir / "redis-server.pid"),
            ]
            cmd += self._redis_security_args(port)
            proc = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
            self.redis_pidfile.write_text(str(proc.pid))
            pid = proc.pid
        deadline = time.monotonic() + timeout
        detail = ""
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                raise StackError(f"redis-server exited during start-up; see {self.redis_log}")
            ok, detail = redis_healthy(self.s, timeout=1.0)
            if ok:
                return ServiceStatus("redis", self.s.redis.url, True, pid, True, self.redis_log, detail)
            time.sleep(0.2)
        raise StackError(f"Redis did not answer PING within {timeout:.0f}s ({detail}); see {self.redis_log}")

    def _redis_security_args(self, port: int) -> list[str]:
        """TLS on the URL's port for rediss:// URLs (the local CA's certificate); an ACL user
        (and the default user off) when ``redis.username`` is set; else ``requirepass``."""
        r = self.s.redis
        args: list[str] = []
        if r.uses_tls:
            certs = self.certs()
            args += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(certs.cert),
                     "--tls-key-file", str(certs.key), "--tls-ca-cert-file", str(certs.ca),
                     "--tls-auth-clients", "no"]  # fmt: skip
        if r.password is not None:
            pw = r.password.get_secret_value()
            if r.username:
                args += [
                    "--user",
                    "default",
                    "off",
                    "--user",
                    r.username,
                    "on",
                    f">{pw}",
                    "~*",
                    "&*",
                    "+@all",
                ]
            else:
                args += ["--requirepass", pw]
        return args

    # -- Redis Cluster ---------------------------------------------------------------------
    def cluster_ports(self) -> list[int]:
        _, port = self.s.redis.host_port
        return [port + k for k in range(self.s.redis.cluster_nodes)]

    def cluster_pidfile(self, port: int) -> Path:
        return self.redis_dir / f"node-{port}" / "redis.pid"

    def start_redis_cluster(self, timeout: float = 30.0) -> ServiceStatus:
        """``redis.cluster_nodes`` masters (cluster mode, no replicas) on the URL's port and the next
        ones, joined with ``redis-cli --cluster create`` the first time; their state persists."""
        host, first = self.s.redis.host_port
        if first + self.s.redis.cluster_nodes - 1 > 55535:
            raise StackError(
                f"Redis Cluster ports must be at most 55535 (each node's bus listens on its port + 10000); "
                f"the URL's port {first} with {self.s.redis.cluster_nodes} nodes is too high: fix STREAMREC_REDIS_URL"
            )
        ok, detail = redis_healthy(self.s, timeout=1.0)
        if ok and not any(self._read_pid(self.cluster_pidfile(p)) for p in self.cluster_ports()):
            return ServiceStatus("redis", self.s.redis.url, True, None, False, None, f"external, {detail}")
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            raise StackError("redis-server / redis-cli not found on PATH: `apt-get install -y redis-server`")
        conf = self.deploy / f"redis-{self.redis_profile}.conf"
        fresh = False
        for port in self.cluster_ports():
            node = self.redis_dir / f"node-{port}"
            if self._read_pid(self.cluster_pidfile(port)) is not None:
                continue
            if _port_open(host, port):
                raise StackError(
                    f"port {host}:{port} is taken by something else; the local cluster needs "
                    f"{self.s.redis.cluster_nodes} free ports from the one in STREAMREC_REDIS_URL"
                )
            node.mkdir(parents=True, exist_ok=True)
            fresh |= not (node / "nodes.conf").exists()
            cmd = [server, str(conf), "--port", str(port), "--bind", host, "--dir", str(node),
                   "--logfile", str(node / "redis.log"), "--cluster-enabled", "yes",
                   "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000",
                   "--pidfile", str(node / "redis-server.pid")]  # fmt: skip
            if self.s.redis.password is not None:
                pw = self.s.redis.password.get_secret_value()
                cmd += ["--requirepass", pw, "--masterauth", pw]
            proc = subprocess.Popen(
                cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
            )
            self.cluster_pidfile(port).write_text(str(proc.pid))
        deadline = time.monotonic() + timeout
        for port in self.cluster_ports():
            while not _port_open(host, port):
                if time.monotonic() > deadline:
                    raise StackError(
                        f"cluster node {host}:{port} did not start; see {self.redis_dir}/node-{port}/redis.log"
                    )
                time.sleep(0.1)
        if fresh:
            cmd = [cli, "--cluster", "create", *(f"{host}:{p}" for p in self.cluster_ports()),
                   "--cluster-replicas", "0", "--cluster-yes"]  # fmt: skip
            if self.s.redis.password is not None:
                cmd += ["-a", self.s.redis.password.get_secret_value(), "--no-auth-warning"]
            made = subprocess.run(cmd, capture_output=True, text=True)
            if made.returncode != 0 and "already" not in made.stdout + made.stderr:
                raise StackError(
                    f"redis-cli --cluster create failed:\n{made.stdout[-1500:]}{made.stderr[-1500:]}"
                )
        while time.monotonic() < deadline:
            ok, detail = redis_healthy(self.s, timeout=1.0)
            if ok:
                pid = self._read_pid(self.cluster_pidfile(self.cluster_ports()[0]))
                return ServiceStatus("redis", self.s.redis.url, True, pid, True, self.redis_dir, detail)
            time.sleep(0.2)
        raise StackError(
            f"the Redis Cluster is not ok within {timeout:.0f}s ({detail}); see {self.redis_dir}"
        )

    # -- all -----------------------------------------------------------------------------
    def up(self) -> list[ServiceStatus]:
        self.state.mkdir(parents=True, exist_ok=True)
        return [self.start_redis(), self.start_kafka()]

    def _stop(self, pidfile: Path, timeout: float) -> int | None:
        pid = self._read_pid(pidfile)
        if pid is None:
            pidfile.unlink(missing_ok=True)
            return None
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _pid_alive(pid):
            time.sleep(0.2)
        if _pid_alive(pid):
            os.killpg(pid, signal.SIGKILL)
            time.sleep(0.2)
        # Reap if we are its parent (same process started it).
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        pidfile.unlink(missing_ok=True)
        return pid

    def kill(self, service: str) -> int:
        """SIGKILL the local ``kafka`` or ``redis`` (fault drills: no shutdown, no flush); its pid."""
        pidfile = {"kafka": self.kafka_pidfile, "redis": self.redis_pidfile}[service]
        pid = self._read_pid(pidfile)
        if pid is None:
            raise StackError(f"no local {service} runs (pid file {pidfile}); start it with `streamrec up`")
        os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return pid

    def down(self) -> dict[str, int | None]:
        stopped = {
            "kafka": self._stop(self.kafka_pidfile, 30.0),
            "redis": self._stop(self.redis_pidfile, 10.0),
        }
        if self.redis_dir.is_dir():  # the nodes of a local cluster (whatever the settings say now)
            for pidfile in sorted(self.redis_dir.glob("node-*/redis.pid")):
                pid = self._stop(pidfile, 10.0)
                stopped["redis"] = stopped["redis"] or pid
        return stopped

    def status(self) -> list[ServiceStatus]:
        kpid = self._read_pid(self.kafka_pidfile)
        kok, kdetail = kafka_healthy(self.s, timeout=2.0)
        rpid = self._read_pid(self.redis_pidfile)
        rok, rdetail = redis_healthy(self.s, timeout=1.0)
        return [
            ServiceStatus(
                "kafka",
                self.s.kafka.bootstrap_servers,
                kok,
                kpid,
                kpid is not None,
                self.kafka_log if kpid else None,
                kdetail,
            ),
            ServiceStatus(
                "redis",
                self.s.redis.url,
                rok,
                rpid,
                rpid is not None,
                self.redis_log if rpid else None,
                rdetail,
            ),
        ]
