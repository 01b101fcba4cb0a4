"""Deployment: the compose topology as real processes on loopback (TLS, SuperNode auth),
key generation, and the compose files' promises (baked images, read-only data, only the
fleet endpoint reachable by hospitals)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ec import ECDSA
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from common.certs import CertificateError, generate_deployment_keys
from simulations.scenario import load_scenario
from common.provenance.verify import verify_log
from simulations.datasets import build_site, write_reference_set
from loopback import LoopbackDeployment

REPO = Path(__file__).resolve().parents[1]
SCENARIO = REPO / "tests" / "fixtures" / "loopback.toml"
DOCKER = REPO / "docker"


@pytest.mark.timeout(900)
def test_tls_and_node_auth_topology_runs_a_federation_and_rejects_an_unregistered_node(tmp_path):
    scenario = load_scenario(str(SCENARIO))
    hospitals = [site.name for site in scenario.data.sites]
    data = {}
    for index, name in enumerate(hospitals):
        data[name] = tmp_path / "data" / f"{name}.npz"
        build_site(scenario, index).save(data[name])
    run_dir = tmp_path / "run"
    reference = write_reference_set(scenario, tmp_path / "reference.npz", cases=60)
    with LoopbackDeployment(tmp_path / "deployment", [*hospitals, "intruder"]) as deployment:
        deployment.start_superlink()
        for name in hospitals:
            deployment.register(name)
        for name in hospitals:
            deployment.start_supernode(name, data=data[name], state_dir=run_dir / "hospitals")
        # Same software, a valid key signed by nobody's registration: must be turned away.
        deployment.start_supernode("intruder", data=data["hospital-A"])
        result = deployment.run_app(
            REPO,
            f'scenario="{SCENARIO}" run-dir="{run_dir}" signing-key="{deployment.keys.provenance_key}" '
            f'guard-reference="{reference}"',
            timeout_s=600,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        superlink_log = deployment.log("superlink").read_text(errors="replace")
        intruder_log = deployment.log("intruder").read_text(errors="replace")

    assert "No SuperNode found with the given public key" in superlink_log
    assert "Exit Code: 305" in intruder_log
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1]
    assert set(metrics["rounds"][0]["sites"]) == set(hospitals)
    start = json.loads((run_dir / "provenance" / "log.jsonl").read_text().splitlines()[0])["body"]
    # Each participant is recorded with the name and key it was registered under.
    assert sorted(p["identity"].split(":")[0] for p in start["participants"]) == sorted(hospitals)
    status = verify_log(run_dir / "provenance")
    assert status.ok, status.problems
    assert all((run_dir / "hospitals" / name / "checkpoints.jsonl").is_file() for name in hospitals)
    # The guard ran in deployment, on the reference set the run config named, and said so.
    assert start["guard"]["mode"] == "reference set" and start["guard"]["reference_set"]["cases"] == 60
    records = [json.loads(line) for line in (run_dir / "provenance" / "log.jsonl").read_text().splitlines()]
    round_one = next(r["body"] for r in records if r["kind"] == "round")
    assert round_one["guard"]["direction"] == "ran on 60 reference cases (reference.npz, sha256 " + \
        start["guard"]["reference_set"]["sha256"][:12] + ")"
    assert set(round_one["verdicts"]) == {"hospital-A", "hospital-B", "hospital-C"}
    assert (run_dir / "anomalies" / "round-001.json").is_file()


def test_certs_are_usable_and_secrets_private(tmp_path):
    keys = generate_deployment_keys(tmp_path, hospitals=["hospital-A"], server_hosts=["superlink", "127.0.0.1"])
    ca = x509.load_pem_x509_certificate(keys.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(keys.server_certificate.read_bytes())
    assert server.issuer == ca.subject
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, ECDSA(server.signature_hash_algorithm))
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "superlink" in names.get_values_for_type(x509.DNSName)
    private = load_ssh_private_key(keys.node_private_key("hospital-A").read_bytes(), None)
    public = load_ssh_public_key(keys.node_public_key("hospital-A").read_bytes())
    assert private.public_key().public_numbers() == public.public_numbers()
    for secret in (keys.server_key, keys.node_private_key("hospital-A"), tmp_path / "ca.key"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret


def test_certs_refuse_bad_input(tmp_path):
    with pytest.raises(CertificateError, match="hospital names"):
        generate_deployment_keys(tmp_path, hospitals=["bad name"], server_hosts=["x"])
    with pytest.raises(CertificateError, match="repeat"):
        generate_deployment_keys(tmp_path, hospitals=["a", "a"], server_hosts=["x"])
    generate_deployment_keys(tmp_path, hospitals=["a"], server_hosts=["x"])
    with pytest.raises(CertificateError, match="already holds a CA"):
        generate_deployment_keys(tmp_path, hospitals=["a"], server_hosts=["x"])


def _compose(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_hospital_compose_mounts_data_read_only_and_reaches_only_the_fleet_endpoint():
    compose = _compose(DOCKER / "hospital" / "compose.yaml")
    (supernode,) = compose["services"].values()
    assert "ports" not in supernode  # a hospital serves nothing: it only dials out
    data_mounts = [v for v in supernode["volumes"] if v["target"].startswith("/data")]
    assert data_mounts and all(v["read_only"] for v in data_mounts)
    command = " ".join(supernode["command"])
    assert "--auth-supernode-private-key" in command and "--root-certificates" in command
    assert "--insecure" not in command


def test_server_compose_exposes_only_the_fleet_api_to_hospitals():
    compose = _compose(DOCKER / "server" / "compose.yaml")
    services = compose["services"]
    published = {name: s.get("ports", []) for name, s in services.items()}
    public = {name: ports for name, ports in published.items() if any(not str(p).startswith("127.0.0.1:") for p in ports)}
    assert list(public) == ["fleet-gateway"]
    superlink = " ".join(services["superlink"]["command"])
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation", "--ssl-certfile"):
        assert flag in superlink
    gateway = (DOCKER / "server" / "fleet-gateway.conf").read_text()
    assert "location /v1/fleet/" in gateway and "return 403" in gateway


def test_image_bakes_dependencies_and_installs_nothing_at_run_time():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "pip install" in dockerfile and "torch==2.13.0" in dockerfile
    for compose in (DOCKER / "server" / "compose.yaml", DOCKER / "hospital" / "compose.yaml"):
        text = compose.read_text()
        assert "pip install" not in text and "uv sync" not in text
