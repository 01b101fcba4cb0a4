"""The Docker topology as real processes on this machine (loopback), for tests and demos.

One SuperLink with TLS and SuperNode authentication, hospitals registered by their public
keys, one SuperNode per hospital with its data file, and ``flwr run`` submitting the
causalfed app: the same commands the compose files in ``docker/`` run, minus Docker.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.certs import PROVENANCE_PUBLIC_FILE, DeploymentKeys, generate_deployment_keys

CONNECTION = "causalfed"


class DeploymentError(RuntimeError):
    """A process of the topology failed; the message carries the tail of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tool(name: str) -> str:
    # The console scripts live beside the running interpreter (venvs on CI).
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else (shutil.which(name) or name)


@dataclass
class LoopbackDeployment:
    """Start with ``with LoopbackDeployment(root, hospitals) as deployment: ...``."""

    root: Path
    hospitals: list[str]
    port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.keys: DeploymentKeys = generate_deployment_keys(
            self.root / "keys", hospitals=self.hospitals, server_hosts=["localhost", "127.0.0.1"]
        )
        self.flwr_home = self.root / "flwr-home"
        self.flwr_home.mkdir(exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.keys.ca_certificate}"\n'
        )

    @property
    def env(self) -> dict[str, str]:
        return os.environ | {"FLWR_HOME": str(self.flwr_home), "PYTHONUNBUFFERED": "1"}

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def tail(self, name: str, lines: int = 25) -> str:
        path = self.log(name)
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        handle = open(self.log(name), "wb")
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=self.env, cwd=self.root, start_new_session=True
        )
        handle.close()
        self.processes[name] = process
        return process

    def start_superlink(self, *, timeout_s: float = 60) -> None:
        self._spawn("superlink", [
            _tool("flower-superlink"),
            "--ssl-ca-certfile", str(self.keys.ca_certificate),
            "--ssl-certfile", str(self.keys.server_certificate),
            "--ssl-keyfile", str(self.keys.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--database", str(self.root / "superlink.db"),
            "--host", "127.0.0.1", "--port", str(self.port),
        ])
        self._wait_for("superlink", "Uvicorn running on https://", timeout_s)

    def _wait_for(self, name: str, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                raise DeploymentError(f"{name} exited with {self.processes[name].returncode}:\n{self.tail(name)}")
            if self.log(name).exists() and text in self.log(name).read_text(errors="replace"):
                return
            time.sleep(0.3)
        raise DeploymentError(f"{name} not ready after {timeout_s:.0f}s:\n{self.tail(name)}")

    def flwr(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_tool("flwr"), *args], env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout_s
        )

    def register(self, hospital: str) -> None:
        result = self.flwr("supernode", "register", str(self.keys.node_public_key(hospital)), CONNECTION, "--name", hospital)
        if result.returncode != 0:
            raise DeploymentError(f"registering {hospital} failed:\n{result.stdout}\n{result.stderr}")

    def start_supernode(self, hospital: str, *, data: Path, key_of: str | None = None, state_dir: Path | None = None) -> subprocess.Popen:
        """A hospital's SuperNode; ``key_of`` lets it present another hospital's key (tests)."""
        # The hospital pins the provenance key from `causalfed certs`: it refuses checkpoints
        # signed by anything else.
        pinned = self.keys.hospital_dir(key_of or hospital) / PROVENANCE_PUBLIC_FILE
        config = f'data-path="{data}" server-key="{pinned}"'
        if state_dir is not None:
            config += f' checkpoint-dir="{state_dir}"'
        return self._spawn(hospital, [
            _tool("flower-supernode"),
            "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.keys.ca_certificate),
            "--auth-supernode-private-key", str(self.keys.node_private_key(key_of or hospital)),
            "--node-config", config,
            "--port", str(free_port()),
        ])

    def run_app(self, app_dir: Path, run_config: str, *, timeout_s: float) -> subprocess.CompletedProcess:
        """``flwr run`` the app and stream its logs until the run ends."""
        return self.flwr("run", str(app_dir), CONNECTION, "--run-config", run_config, "--stream", timeout_s=timeout_s)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    def __enter__(self) -> LoopbackDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
