"""deploy/: every file parses, and every command, variable and path it names exists here."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
YAML_FILES = sorted(DEPLOY.rglob("*.yaml"))
ALL_FILES = sorted(p for p in DEPLOY.rglob("*") if p.is_file())


def cli_commands() -> set[str]:
    import typer.main

    from astronn_dist.producer.cli import app

    return set(typer.main.get_command(app).commands)


def config_variables() -> set[str]:
    text = (REPO / "worker" / "config.py").read_text()
    return set(re.findall(r'"(ASTRONN_DIST_[A-Z_]+)"', text))


def test_deploy_has_every_kind_of_file():
    names = {p.relative_to(DEPLOY).as_posix() for p in ALL_FILES}
    assert {"Dockerfile.cpu", "Dockerfile.cuda", "compose.yaml", "README.md"} <= names
    assert any(n.startswith("k8s/") for n in names)
    assert any(n.startswith("slurm/") for n in names)
    assert any(n.startswith("systemd/") for n in names)


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} holds no document"
    if path.parent.name == "k8s":
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path}: not a manifest"


def test_gpu_worker_requests_a_gpu():
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "worker-gpu.yaml").read_text()))
    container = docs[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "livenessProbe" in container and "startupProbe" in container
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert "--appendonly" in compose["services"]["redis"]["command"]
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_keda_scales_on_the_queue_the_workers_consume():
    from astronn_dist.worker.config import QUEUE

    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "keda-scaledobject.yaml").read_text()))
    trigger = docs[0]["spec"]["triggers"][0]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == QUEUE


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_named_commands_variables_and_paths_exist(path: Path):
    text = path.read_text()
    commands = cli_commands()
    # `astronn-dist CMD` in shell lines, `"astronn-dist", "CMD"` in exec-form lists
    for sub in re.findall(r'(?<![\w-])astronn-dist(?:", "|[ \t]+)([a-z][a-z-]+)', text):
        assert sub in commands, f"{path.name} runs `astronn-dist {sub}`, which does not exist"
    # exec-form entrypoint + args / command lists in YAML
    for args in re.findall(r'args: \["([a-z-]+)"', text) + re.findall(r'command: \["([a-z-]+)"', text):
        if args not in {"redis-server", "redis-cli", "celery", "sh", "CMD", "astronn-dist", "pg_isready"}:
            assert args in commands, f"{path.name} passes `{args}` to astronn-dist, which has no such command"
    known = config_variables()
    for var in set(re.findall(r"ASTRONN_DIST_[A-Z_]+", text)):
        assert var in known, f"{path.name} names {var}, which worker/config.py does not read"
    for rel in re.findall(r"(?:deploy|scripts|worker|producer)/[\w./@-]+", text):
        rel = rel.rstrip(".")
        assert (REPO / rel).exists(), f"{path.name} names {rel}, which is not in the repository"
    for module in re.findall(r"celery -A ([\w.]+)", text):
        assert importlib.util.find_spec(module) is not None, f"{path.name}: no module {module}"


def test_systemd_and_slurm_use_real_commands():
    for unit in (DEPLOY / "systemd").glob("*.service"):
        text = unit.read_text()
        assert "[Service]" in text and "ExecStart=" in text
        for line in re.findall(r"^Exec\w*=(.*)$", text, flags=re.M):
            argv = shlex.split(line)
            assert argv[0].endswith("astronn-dist") and argv[1] in cli_commands()
    sbatch = (DEPLOY / "slurm" / "astronn-dist-workers.sbatch").read_text()
    assert sbatch.startswith("#!/bin/bash") and "#SBATCH --gres=gpu:1" in sbatch
