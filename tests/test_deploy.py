"""The Kubernetes manifests in ``deploy/kubernetes``: valid objects, and consistent with each other and the code.

Rendered as ``kubectl apply -k`` would (the files kustomization.yaml lists, in order; no kustomize binary),
then checked offline against the Kubernetes OpenAPI schemas that ``kubernetes-validate`` bundles, in strict
mode (an unknown or misspelt field fails). The other checks catch what a schema cannot: a Service that
selects no pod, an environment variable no code reads, a secret written as a literal, a probe on a route
the service does not serve.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from core import config

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "deploy" / "kubernetes"
KUSTOMIZATION = MANIFESTS / "kustomization.yaml"
# The oldest Kubernetes a shop is likely to run, and the newest the installed schemas describe.
K8S_VERSIONS = ("1.30", "1.37")
NAMESPACE = "persona"
SECRET = "persona-secrets"
SECRET_WORDS = ("URL", "KEY", "SALT", "PASSWORD")  # an env var named so holds a secret
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")
SERVICE_CONTAINER = "persona"  # the bento's container in the `persona` Deployment
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"  # on each pod of an Indexed Job (Kubernetes 1.28+)
HEALTH_ROUTES = ("/livez", "/readyz", "/healthz")  # a probe on another route would answer for more than health


# --- rendering ---------------------------------------------------------------------------------------
def listed_files() -> list[str]:
    """The resources kustomization.yaml applies, in its order."""
    return yaml.safe_load(KUSTOMIZATION.read_text())["resources"]


def render() -> list[dict]:
    """Every object ``kubectl apply -k deploy/kubernetes`` would send, in order."""
    return [doc for name in listed_files() for doc in yaml.safe_load_all((MANIFESTS / name).read_text()) if doc]


def of_kind(objects: list[dict], *kinds: str) -> list[dict]:
    return [o for o in objects if o["kind"] in kinds]


def pod_spec(obj: dict) -> dict | None:
    """The pod template's spec of a workload or (cron)job; None for objects that run no pod."""
    spec = obj.get("spec", {})
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    template = spec.get("template") if obj["kind"] in (*WORKLOADS, "Job", "CronJob") else None
    return template["spec"] if template else None


def containers(obj: dict) -> list[dict]:
    """Its pods' containers, init containers included (they see the same secrets)."""
    spec = pod_spec(obj) or {}
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def container_ports(container: dict) -> set[str | int]:
    """The names and numbers a Service's targetPort or a probe's port may refer to."""
    ports = container.get("ports", [])
    return {p["name"] for p in ports if "name" in p} | {p["containerPort"] for p in ports}


def env_vars(objects: list[dict]) -> Iterator[tuple[str, dict]]:
    """(where, env entry) for every container env var of every object."""
    for obj in objects:
        for container in containers(obj):
            for var in container.get("env", []):
                yield f"{obj['kind']}/{obj['metadata']['name']}/{container['name']}", var


def secret_refs(objects: list[dict]) -> list[dict]:
    return [var["valueFrom"]["secretKeyRef"] for _, var in env_vars(objects)
            if "secretKeyRef" in var.get("valueFrom", {})]


def code_text() -> str:
    """The source of every package the project ships (pyproject's package list): not tests, not deploy."""
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = [pattern.rstrip("*") for pattern in found["include"]]
    return "\n".join(p.read_text() for name in packages for p in sorted((ROOT / name).rglob("*.py")))


def open_routes() -> set[str]:
    """``RequestGuard.OPEN`` in bentos/edge.py, read from the source (importing it would load the service)."""
    tree = ast.parse((ROOT / "bentos" / "edge.py").read_text())
    guard = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "RequestGuard")
    assign = next(s for s in guard.body if isinstance(s, ast.Assign) and s.targets[0].id == "OPEN")
    return set(ast.literal_eval(assign.value))


def bentoml_serves(path: str) -> bool:
    """Whether BentoML's server app declares ``path`` as a route (read from its source, not imported)."""
    package = Path(importlib.util.find_spec("bentoml").origin).parent
    return f'"{path}"' in (package / "_internal" / "server" / "base_app.py").read_text()


# --- the checks --------------------------------------------------------------------------------------
def test_every_manifest_is_listed_in_kustomization() -> None:
    on_disk = {p.name for p in MANIFESTS.glob("*.yaml")} - {KUSTOMIZATION.name}
    listed = listed_files()
    assert len(listed) == len(set(listed)), "a file is listed twice"
    assert set(listed) == on_disk, f"unlisted: {on_disk - set(listed)}; missing: {set(listed) - on_disk}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schema(version: str) -> None:
    """Strict: a field the API does not know (a typo) fails, as does a kind with no schema."""
    problems = []
    for obj in render():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
    assert not problems, "\n".join(problems)


def test_objects_are_in_the_persona_namespace() -> None:
    objects = render()
    assert [o["metadata"]["name"] for o in of_kind(objects, "Namespace")] == [NAMESPACE]
    outside = [f"{o['kind']}/{o['metadata']['name']}" for o in objects
               if o["kind"] != "Namespace" and o["metadata"].get("namespace") != NAMESPACE]
    assert not outside, f"not in namespace {NAMESPACE}: {outside}"


def job_spec(obj: dict) -> dict:
    return obj["spec"]["jobTemplate"]["spec"] if obj["kind"] == "CronJob" else obj["spec"]


def pod_labels(obj: dict) -> list[dict]:
    """The label sets of the pods an object runs: its template's, and for an Indexed Job each pod's with the
    completion index Kubernetes adds."""
    if pod_spec(obj) is None:
        return []
    spec = obj["spec"] if obj["kind"] in WORKLOADS else job_spec(obj)
    labels = spec["template"]["metadata"].get("labels", {})
    if obj["kind"] in WORKLOADS or spec.get("completionMode") != "Indexed":
        return [labels]
    return [{**labels, INDEX_LABEL: str(k)} for k in range(spec["completions"])]


def test_services_select_pods_that_serve_their_ports() -> None:
    objects = render()
    for service in of_kind(objects, "Service"):
        name, selector = service["metadata"]["name"], service["spec"]["selector"]
        pods = [o for o in of_kind(objects, *WORKLOADS, "Job", "CronJob")
                if o["metadata"]["namespace"] == service["metadata"]["namespace"]
                and any(selector.items() <= labels.items() for labels in pod_labels(o))]
        assert pods, f"Service {name} selects no pod: {selector}"
        ports = set().union(*(container_ports(c) for o in pods for c in containers(o)))
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports, f"Service {name} sends port {port['port']} to {target}, which its pods lack"


def test_persona_env_vars_are_read_by_the_code() -> None:
    code = code_text()
    unread = {f"{where}: {var['name']}" for where, var in env_vars(render())
              if var["name"].startswith("PERSONA_") and not re.search(rf"\b{var['name']}\b", code)}
    assert not unread, f"no shipped code reads: {sorted(unread)}"


def test_secrets_come_from_the_one_secret() -> None:
    """A URL, key, salt or password is never a literal in a manifest, and the Secret itself is not committed."""
    objects = render()
    literal = [f"{where}: {var['name']}" for where, var in env_vars(objects)
               if any(word in var["name"] for word in SECRET_WORDS)
               and ("value" in var or "secretKeyRef" not in var.get("valueFrom", {}))]
    assert not literal, f"secrets must be valueFrom.secretKeyRef: {literal}"
    assert {ref["name"] for ref in secret_refs(objects)} == {SECRET}
    assert not of_kind(objects, "Secret"), "the Secret is created by hand (deploy/README.md), never committed"


def test_readme_creates_every_required_secret_key() -> None:
    readme = (ROOT / "deploy" / "README.md").read_text()
    required = {ref["key"] for ref in secret_refs(render()) if not ref.get("optional")}
    missing = {key for key in required if f"--from-literal={key}=" not in readme}
    assert not missing, f"deploy/README.md's `kubectl create secret` lacks {sorted(missing)}"


def test_probes_use_routes_the_service_serves() -> None:
    """BentoML's health routes, left open by the API-key guard: a probe without a key must get a 200."""
    service = next(o for o in of_kind(render(), "Deployment") if o["metadata"]["name"] == SERVICE_CONTAINER)
    container = next(c for c in containers(service) if c["name"] == SERVICE_CONTAINER)
    ports = container_ports(container)
    probes = [container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")]
    assert all("httpGet" in p for p in probes), "the service's probes are HTTP"
    for probe in (p["httpGet"] for p in probes):
        assert probe["path"] in HEALTH_ROUTES, f"{probe['path']} is not a health route"
        assert probe["path"] in open_routes(), f"{probe['path']} needs the API key (bentos/edge.py RequestGuard.OPEN)"
        assert bentoml_serves(probe["path"]), f"BentoML serves no {probe['path']}"
        assert probe["port"] in ports, f"probe port {probe['port']} is not a port of the container"


def test_configmap_persona_yaml_is_the_prod_profile(tmp_path: Path) -> None:
    """The workspace settings the pods mount load with the code's own reader, as the prod profile."""
    configmap = next(o for o in of_kind(render(), "ConfigMap") if o["metadata"]["name"] == "persona-config")
    (tmp_path / config.CONFIG_FILE).write_text(configmap["data"][config.CONFIG_FILE])
    assert config.load(tmp_path).profile == "prod"


def test_spark_executors_share_the_jobs_workspace() -> None:
    """Executors write the feature tables to the claim the build reads them back from."""
    objects = render()
    configmap = next(o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"] == "persona-config")
    conf = dict(line.split(None, 1) for line in configmap["data"]["spark-defaults.conf"].splitlines() if line)
    claim = conf["spark.kubernetes.executor.volumes.persistentVolumeClaim.workspace.options.claimName"]
    pvc = next((o for o in of_kind(objects, "PersistentVolumeClaim") if o["metadata"]["name"] == claim), None)
    assert pvc is not None and "ReadWriteMany" in pvc["spec"]["accessModes"], f"{claim}: no ReadWriteMany claim"
    build = next(o for o in of_kind(objects, "CronJob") if o["metadata"]["name"] == "persona-features-build")
    assert conf["spark.kubernetes.container.image"] == containers(build)[0]["image"]
    assert conf["spark.kubernetes.namespace"] == NAMESPACE
    assert claim in {v["persistentVolumeClaim"]["claimName"] for v in pod_spec(build)["volumes"]
                     if "persistentVolumeClaim" in v}
    assert pod_spec(build)["serviceAccountName"] in {o["metadata"]["name"] for o in of_kind(objects, "ServiceAccount")}
    # The executors read the log themselves (spark_source reads either variable), from the driver's Secret key.
    driver_env = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in containers(build)[0]["env"]}
    ref = driver_env["PERSONA_POSTGRES_URL"]
    assert conf["spark.kubernetes.executor.secretKeyRef.PERSONA_EVENT_LOG_URL"] == f"{ref['name']}:{ref['key']}"



def test_the_spark_jobs_feed_the_services_stores() -> None:
    """Every Spark job and the materialization run the spark profile with PERSONA_POSTGRES_URL and
    PERSONA_REDIS_URL from the service's Secret keys: their registry and online store are the service's
    (feast_config), so the nightly build reaches what /rank reads."""
    objects = render()
    service = next(o for o in of_kind(objects, "Deployment") if o["metadata"]["name"] == "persona")
    serving = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef")
               for c in containers(service) for e in c.get("env", [])}
    jobs = of_kind(objects, "CronJob")
    assert {j["metadata"]["name"] for j in jobs} >= {"persona-features-build", "persona-features-materialize",
                                                     "persona-train-and-score"}
    for job in jobs:
        for container in containers(job):
            env = {e["name"]: e for e in container.get("env", [])}
            assert env["PERSONA_PROFILE"]["value"] == "spark", job["metadata"]["name"]
            for name in ("PERSONA_POSTGRES_URL", "PERSONA_REDIS_URL"):
                assert env[name]["valueFrom"]["secretKeyRef"] == serving[name], (job["metadata"]["name"], name)
    for job in jobs:
        for line in persona_lines(job):
            assert line[line.index("--profile") + 1] == "spark", line


def persona_lines(obj: dict) -> Iterator[list[str]]:
    """Every `persona ...` command line its containers run: as the command, or in an `sh -c` script."""
    import shlex

    for container in containers(obj):
        command = [*(container.get("command") or []), *(container.get("args") or [])]
        if command[:1] == ["torchrun"] and "--no-python" in command:  # torchrun starts `persona ...` itself
            command = command[command.index("--no-python") + 1:]
        if command[:1] == ["persona"]:
            yield command
        elif command[:2] == ["sh", "-c"]:
            for line in " ".join(command[2:]).split("&&"):
                words = shlex.split(line)
                if words[:1] == ["persona"]:
                    yield words


def test_every_persona_command_in_a_manifest_parses_with_the_cli() -> None:
    """A Job's `persona ...` line names a command and options the CLI has (parsed, not run): a renamed
    option would otherwise fail only on the cluster, at night."""
    import typer

    from persona.cli import app

    found = 0
    for obj in render():
        for line in persona_lines(obj):
            found += 1
            command, words = typer.main.get_command(app), line[1:]
            while hasattr(command, "list_commands"):  # a group (typer's own click): `persona features build`
                name, *words = words
                command = command.get_command(command.context_class(command), name)
                assert command is not None, f"{obj['metadata']['name']}: no command {name!r} in {line}"
            try:
                command.make_context(line[1], list(words))  # raises on an unknown option or a bad value
            except Exception as exc:  # noqa: BLE001 - typer's vendored click raises its own UsageError
                raise AssertionError(f"{obj['metadata']['name']}: {' '.join(line)}: {exc}") from exc
    assert found >= 6  # the build, apply and materialise, and the three steps of training and scoring


def test_training_across_pods_is_one_torchrun_group() -> None:
    """The DDP Job: as many pods as torchrun's --nnodes, each its own node rank (its completion index),
    all meeting at a Service that selects pod 0 on the port torchrun listens on, all reading the
    training set from the one shared claim, and none asking for --nproc (torchrun sets the processes)."""
    objects = render()
    launched = [o for o in of_kind(objects, "Job", "CronJob")
                if any((c.get("command") or [])[:1] == ["torchrun"] for c in containers(o))]
    assert launched, "no Job trains across pods"
    for job in launched:
        name, spec = job["metadata"]["name"], job_spec(job)
        (container,) = containers(job)
        command = container["command"]
        value = {flag: command[command.index(flag) + 1] for flag in
                 ("--nnodes", "--nproc-per-node", "--node-rank", "--master-addr", "--master-port")}
        assert spec["completionMode"] == "Indexed", name
        assert spec["completions"] == spec["parallelism"] == int(value["--nnodes"]), name
        env = {e["name"]: e for e in container["env"]}
        rank_var = re.fullmatch(r"\$\((\w+)\)", value["--node-rank"]).group(1)
        assert env[rank_var]["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.labels['{INDEX_LABEL}']", name
        service = next(o for o in of_kind(objects, "Service") if o["metadata"]["name"] == value["--master-addr"])
        assert service["spec"]["selector"].items() <= pod_labels(job)[0].items(), "the address is not pod 0"
        assert not any(service["spec"]["selector"].items() <= labels.items() for labels in pod_labels(job)[1:])
        port = next(p for p in service["spec"]["ports"] if p["port"] == int(value["--master-port"]))
        assert any(p["name"] == port["targetPort"] and p["containerPort"] == int(value["--master-port"])
                   for p in container["ports"]), name
        line = next(persona_lines(job))
        assert "--training-set" in line and "--nproc" not in line, line
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod_spec(job)["volumes"]
                  if "persistentVolumeClaim" in v}
        pvcs = [o for o in of_kind(objects, "PersistentVolumeClaim") if o["metadata"]["name"] in claims]
        assert pvcs and all("ReadWriteMany" in o["spec"]["accessModes"] for o in pvcs), name
        assert line[line.index("--training-set") + 1].startswith(container["volumeMounts"][0]["mountPath"])
