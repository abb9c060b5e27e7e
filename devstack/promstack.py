"""A real, local Prometheus server for tests and for watching a local worker.

:class:`LocalPrometheus` starts the ``prometheus`` binary (Debian package ``prometheus``)
as a subprocess with a generated configuration that scrapes the given targets every
second, keeps its TSDB in a temporary folder, listens on a free loopback port, waits
until ``/-/ready`` answers, and stops the process (and removes its data) on exit::

    with LocalPrometheus(["127.0.0.1:9464"], rules_files=[DEFAULT_RULES]) as prom:
        prom.wait_for('streamrec_worker_up == 1')
        print(prom.query('sum(rate(streamrec_events_consumed_total[1m]))'))

``python -m devstack.promstack 127.0.0.1:9464`` runs one in the foreground against a local
worker (with the alert rules of ``deploy/prometheus/rules.yml``) until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from streamrec.settings import REPO_ROOT

DEFAULT_RULES = REPO_ROOT / "deploy" / "prometheus" / "rules.yml"
INSTALL_HINT = "install it with `apt-get install -y prometheus` (Debian/Ubuntu; .ci/run does this)"


class PrometheusError(RuntimeError):
    """The local Prometheus could not be started or queried; the message says what to do."""


def find_binary(name: str = "prometheus") -> str:
    """Path of ``prometheus`` or ``promtool`` on PATH; :class:`PrometheusError` when missing."""
    path = shutil.which(name)
    if path is None:
        raise PrometheusError(f"`{name}` is not on PATH; {INSTALL_HINT}")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalPrometheus:
    """A Prometheus server subprocess scraping ``targets`` (``host:port`` of /metrics endpoints).

    Args:
        targets: scrape targets, e.g. ``["127.0.0.1:9464"]``.
        port: listen port on 127.0.0.1; ``None`` picks a free one.
        rules_files: rule files to load (alerting/recording rules), e.g. ``[DEFAULT_RULES]``.
        job: the ``job`` label of the targets.
        labels: extra target labels (e.g. ``{"gpu": "false"}``).
        scrape_interval_s: scrape and rule evaluation interval.
        startup_timeout_s: how long to wait for ``/-/ready``.
        binary: the prometheus executable (default: from PATH).
    """

    def __init__(
        self,
        targets: Sequence[str],
        port: int | None = None,
        rules_files: Sequence[str | Path] = (),
        *,
        job: str = "streamrec-worker",
        labels: Mapping[str, str] | None = None,
        scrape_interval_s: float = 1.0,
        startup_timeout_s: float = 60.0,
        binary: str | None = None,
    ) -> None:
        if not targets:
            raise ValueError("LocalPrometheus needs at least one scrape target (host:port)")
        self.targets = list(targets)
        self.rules_files = [Path(p).resolve() for p in rules_files]
        for p in self.rules_files:
            if not p.is_file():
                raise PrometheusError(f"rule file {p} does not exist")
        self.job = job
        self.labels = dict(labels or {})
        self.scrape_interval_s = scrape_interval_s
        self.startup_timeout_s = startup_timeout_s
        self._fixed_port = port
        self.port: int | None = port
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

    # -- configuration ------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The generated prometheus.yml (as data)."""
        interval = f"{max(int(self.scrape_interval_s * 1000), 100)}ms"
        return {
            "global": {
                "scrape_interval": interval,
                "evaluation_interval": interval,
                "scrape_timeout": interval,
            },
            "rule_files": [str(p) for p in self.rules_files],
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "static_configs": [{"targets": self.targets, "labels": self.labels}],
                }
            ],
        }

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:40123``."""
        if self.port is None:
            raise PrometheusError("LocalPrometheus is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path | None:
        return self._dir / "prometheus.log" if self._dir else None

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> LocalPrometheus:
        """Start the server and wait until it is ready (retries on a port taken meanwhile)."""
        if self._proc is not None:
            raise PrometheusError("LocalPrometheus is already started")
        binary = self._binary or find_binary("prometheus")
        self._dir = Path(tempfile.mkdtemp(prefix="streamrec-prometheus-"))
        cfg = self._dir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        attempts = 1 if self._fixed_port is not None else 3
        last_error = ""
        for _ in range(attempts):
            self.port = self._fixed_port or _free_port()
            log = open(self._dir / "prometheus.log", "wb")  # the child keeps its own copy
            self._proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={cfg}",
                    f"--storage.tsdb.path={self._dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1d",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C of the parent does not reach it before stop()
            )
            log.close()
            try:
                self._wait_ready()
                return self
            except PrometheusError as exc:
                last_error = str(exc)
                self._terminate()
                if "address already in use" not in last_error:
                    break
        self.stop()
        raise PrometheusError(last_error)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PrometheusError(
                    f"prometheus exited with code {self._proc.returncode} on port {self.port}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise PrometheusError(
            f"prometheus on port {self.port} not ready after {self.startup_timeout_s:.0f}s:\n{self.log_tail()}"
        )

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        """Stop the server and delete its data folder (idempotent)."""
        self._terminate()
        if self._dir is not None and not os.environ.get("STREAMREC_KEEP_PROMETHEUS_DATA"):
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines of the server's log (for error messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])  # type: ignore[union-attr]
        except (OSError, AttributeError):
            return ""

    # -- HTTP API -----------------------------------------------------------------------------
    def api(self, path: str, **params: Any) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; :class:`PrometheusError` on an error status."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None}, doseq=True)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            raise PrometheusError(
                f"GET {url}: HTTP {exc.code}: {body.get('errorType', '')}: {body.get('error', body)}"
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise PrometheusError(f"GET {url}: {exc}; is the server running?\n{self.log_tail()}") from exc
        if body.get("status") != "success":
            raise PrometheusError(f"GET {url}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query: the result vector, ``[{"metric": {...}, "value": [ts, "1"]}, ...]``."""
        data = self.api("query", query=expr, time=at)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def values(self, expr: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Instant query as ``{sorted label items: value}``."""
        return {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in self.query(expr)}

    def series_names(self, match: str = '{__name__=~"streamrec_.+"}') -> set[str]:
        """Names of the series Prometheus holds that match ``match``."""
        return {s["__name__"] for s in self.api("series", **{"match[]": match})}

    def targets_health(self) -> dict[str, str]:
        """``{scrape URL: health}`` of the active targets ("up", "down", "unknown")."""
        return {t["scrapeUrl"]: t["health"] for t in self.api("targets")["activeTargets"]}

    def rule_groups(self) -> list[dict[str, Any]]:
        """The loaded rule groups (``/api/v1/rules``)."""
        return self.api("rules")["groups"]

    def wait_for(
        self,
        expr: str,
        timeout: float = 30.0,
        predicate: Callable[[list[dict[str, Any]]], bool] = bool,
    ) -> list[dict[str, Any]]:
        """Poll ``query(expr)`` until ``predicate(result)`` (default: non-empty); return the result.

        Raises :class:`PrometheusError` with the last result and the target health on timeout.
        """
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while True:
            result = self.query(expr)
            if predicate(result):
                return result
            if time.monotonic() >= deadline:
                raise PrometheusError(
                    f"{expr!r} did not match within {timeout:.0f}s; last result {result}; "
                    f"targets {self.targets_health()}"
                )
            time.sleep(min(self.scrape_interval_s / 2, 0.5))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m devstack.promstack HOST:PORT ...``: a local Prometheus until Ctrl-C."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m devstack.promstack", description=main.__doc__)
    ap.add_argument("targets", nargs="+", help="host:port of /metrics endpoints (e.g. 127.0.0.1:9464)")
    ap.add_argument("--port", type=int, default=9090, help="listen port on 127.0.0.1 (default 9090)")
    ap.add_argument("--rules", default=str(DEFAULT_RULES), help="rule file ('' for none)")
    args = ap.parse_args(argv)
    rules = [args.rules] if args.rules else []
    try:
        with LocalPrometheus(args.targets, port=args.port, rules_files=rules) as prom:
            print(f"prometheus on {prom.url} scraping {', '.join(args.targets)}; Ctrl-C stops it", flush=True)
            while prom._proc is not None and prom._proc.poll() is None:
                time.sleep(1)
            raise SystemExit(f"prometheus exited:\n{prom.log_tail()}")
    except KeyboardInterrupt:
        pass
    except PrometheusError as exc:
        raise SystemExit(str(exc)) from exc


if __name__ == "__main__":
    main()
