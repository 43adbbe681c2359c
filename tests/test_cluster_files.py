"""cluster/ validated offline: no network, no cluster.

* every YAML parses;
* each KubeRay object (RayCluster, RayJob, RayCronJob) validates against the ``openAPIV3Schema``
  of its version in the KubeRay v1.7.0 CRDs (../shared/data/kuberay), and carries no field that
  schema does not know (the API server would prune it silently: a typo would be lost);
* the core Kubernetes kinds validate, strictly, against the schemas bundled in
  ``kubernetes-validate``;
* the ``ray up`` config against the schema Ray ships in its own package;
* image tags, ``rayVersion`` and the Dockerfiles' bases follow the Ray pinned in pyproject.toml;
* every entrypoint and container command is an ``anim`` invocation the CLI accepts;
* the GPU worker groups scale from zero with ``nvidia.com/gpu`` limits, and every Ray cluster
  uses token auth.
"""
from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import tomllib
from importlib.resources import files

import jsonschema
import pytest
import yaml

from .conftest import REPO, SHARED_DATA

CLUSTER = REPO / "cluster"
KUBERAY = SHARED_DATA / "kuberay"
K8S_VERSION = "1.37.0"  # the newest Kubernetes whose schemas kubernetes-validate bundles
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}


def ray_version() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [m.group(1) for d in deps if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==(\S+)", d))]
    return pin


def documents() -> list[tuple[str, dict]]:
    """(file name #index, object) of every Kubernetes manifest under cluster/kuberay/."""
    out = []
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                out.append((f"{path.name}#{i}", doc))
    return out


@functools.cache
def crd_schema(kind: str, api_version: str) -> dict:
    if not KUBERAY.is_dir():
        pytest.fail(f"the KubeRay CRDs are missing: expected {KUBERAY} (see ../shared/data/README.md)")
    crd = yaml.load((KUBERAY / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    (found,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert found["served"], f"{kind} {api_version} is not served by KubeRay v1.7.0"
    return found["schema"]["openAPIV3Schema"]


def unknown_fields(obj, schema: dict, where: str = "") -> list[str]:
    """Fields of ``obj`` the structural schema does not declare. A schema with ``properties``
    and neither ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields`` is closed:
    the API server prunes anything else."""
    out = []
    if isinstance(obj, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            if props is not None and key in props:
                out += unknown_fields(value, props[key], f"{where}.{key}")
            elif isinstance(extra, dict):
                out += unknown_fields(value, extra, f"{where}.{key}")
            elif props is not None and not extra and not schema.get("x-kubernetes-preserve-unknown-fields") \
                    and not (where == "" and key in ("apiVersion", "kind", "metadata")):
                out.append(f"{where}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            out += unknown_fields(item, schema["items"], f"{where}[{i}]")
    return out


def check_kuberay(doc: dict) -> list[str]:
    """Every problem of a KubeRay object against its CRD: schema errors, then unknown fields."""
    schema = crd_schema(doc["kind"], doc["apiVersion"])
    validator = jsonschema.Draft7Validator(schema)
    problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    return problems + [f"{f}: not a field of {doc['kind']}" for f in unknown_fields(doc, schema)]


KUBERAY_DOCS = [(name, doc) for name, doc in documents() if doc["apiVersion"].startswith("ray.io/")]
CORE_DOCS = [(name, doc) for name, doc in documents() if not doc["apiVersion"].startswith("ray.io/")]


def test_every_cluster_file_parses_and_names_its_kind():
    docs = documents()
    kinds = {doc["kind"] for _, doc in docs}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "Deployment", "Service", "Secret",
            "PersistentVolumeClaim", "ConfigMap"} <= kinds, kinds
    for name, doc in docs:
        assert doc.get("apiVersion") and doc.get("metadata", {}).get("name"), name
    assert yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())["cluster_name"]


@pytest.mark.parametrize("name, doc", KUBERAY_DOCS, ids=[n for n, _ in KUBERAY_DOCS])
def test_kuberay_objects_validate_against_the_v1_7_0_crds(name, doc):
    assert check_kuberay(doc) == [], name


def test_the_crd_check_refuses_a_bad_value_and_a_misspelt_field():
    """The validation above can fail: a wrong enum value, a wrong type and a field the CRD does
    not have (which the API server would drop without a word) are each reported."""
    (cluster,) = [doc for _, doc in KUBERAY_DOCS if doc["kind"] == "RayCluster"]
    bad = copy.deepcopy(cluster)
    bad["spec"]["authOptions"]["mode"] = "tokens"
    assert any("authOptions" in p and "tokens" in p for p in check_kuberay(bad))
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][1]["minReplica"] = bad["spec"]["workerGroupSpecs"][1].pop("minReplicas")
    problems = check_kuberay(bad)
    assert any("minReplicas" in p and "required" in p for p in problems)
    assert ".spec.workerGroupSpecs[1].minReplica: not a field of RayCluster" in problems
    (job,) = [doc for _, doc in KUBERAY_DOCS if doc["kind"] == "RayJob"]
    bad = copy.deepcopy(job)
    bad["spec"]["ttlSecondsAfterFinished"] = "ten minutes"
    assert any("ttlSecondsAfterFinished" in p for p in check_kuberay(bad))


@pytest.mark.parametrize("name, doc", CORE_DOCS, ids=[n for n, _ in CORE_DOCS])
def test_core_kinds_validate_against_the_kubernetes_schemas(name, doc):
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_core_check_refuses_a_misspelt_field():
    import kubernetes_validate

    (cron,) = [doc for _, doc in CORE_DOCS if doc["kind"] == "CronJob"]
    bad = copy.deepcopy(cron)
    bad["spec"]["concurencyPolicy"] = bad["spec"].pop("concurrencyPolicy")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def ray_clusters(doc: dict) -> list[dict]:
    """The RayCluster specs of a KubeRay object: its own, a RayJob's, a RayCronJob's template's."""
    spec = doc["spec"]
    if doc["kind"] == "RayCronJob":
        spec = spec["jobTemplate"]
    return [spec] if doc["kind"] == "RayCluster" else [spec["rayClusterSpec"]]


def containers(spec: dict) -> list[dict]:
    return spec["template"]["spec"]["containers"]


def test_ray_clusters_use_token_auth_and_gpu_groups_scale_from_zero():
    for name, doc in KUBERAY_DOCS:
        for spec in ray_clusters(doc):
            assert spec["authOptions"]["mode"] == "token", name
            assert spec["rayVersion"] == ray_version(), name
            gpu = [g for g in spec["workerGroupSpecs"] if any(
                "nvidia.com/gpu" in c["resources"].get("limits", {}) for c in containers(g))]
            assert gpu and spec.get("enableInTreeAutoscaling") is True, name
            for group in gpu:
                assert group["minReplicas"] == 0 and group["replicas"] == 0 and group["maxReplicas"] >= 1, name
                for c in containers(group):
                    assert c["image"].endswith("-gpu") and int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name
            for c in containers(spec["headGroupSpec"]) + [c for g in spec["workerGroupSpecs"] if g not in gpu
                                                         for c in containers(g)]:
                assert c["image"].endswith("-cpu"), name
    (cluster,) = [doc for _, doc in KUBERAY_DOCS if doc["kind"] == "RayCluster"]
    assert cluster["spec"]["authOptions"]["secretName"] == "anim-ray-token"
    secrets = {doc["metadata"]["name"]: doc for _, doc in CORE_DOCS if doc["kind"] == "Secret"}
    assert "auth_token" in secrets["anim-ray-token"]["stringData"]  # the key KubeRay reads


def test_a_job_cleans_up_after_itself_and_the_cronjobs_run_once_a_night():
    (job,) = [doc["spec"] for _, doc in KUBERAY_DOCS if doc["kind"] == "RayJob"]
    (cron,) = [doc["spec"] for _, doc in KUBERAY_DOCS if doc["kind"] == "RayCronJob"]
    for spec in (job, cron["jobTemplate"]):
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert spec["entrypointNumCpus"] >= 1
    (k8s_cron,) = [doc["spec"] for _, doc in CORE_DOCS if doc["kind"] == "CronJob"]
    assert k8s_cron["concurrencyPolicy"] == "Forbid" and cron["jobTemplate"]["backoffLimit"] == 0
    # The two schedules and the example manifest's say the same night.
    manifest = tomllib.loads((REPO / "examples" / "series" / "paper_crane.toml").read_text())["schedule"]
    assert cron["schedule"] == k8s_cron["schedule"] == manifest["cron"]
    assert cron["timeZone"] == k8s_cron["timeZone"] == manifest["timezone"]
    assert "RayCronJob=true" in (CLUSTER / "kuberay" / "raycronjob-nightly.yaml").read_text()


def images() -> list[tuple[str, str]]:
    out = []

    def walk(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("image", "worker_image") and isinstance(value, str):
                    out.append((where, value))
                else:
                    walk(value, where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    for name, doc in documents():
        walk(doc, name)
    walk(yaml.safe_load((CLUSTER / "ray-up.yaml").read_text()), "ray-up.yaml")
    return out


def test_images_and_dockerfiles_follow_the_pinned_ray():
    ray = ray_version()
    found = images()
    assert len(found) >= 10
    for where, image in found:
        assert re.fullmatch(rf"[\w./-]+/anim-pipeline:ray{re.escape(ray)}-(cpu|gpu)", image), (where, image)
    for flavour in ("cpu", "gpu"):
        text = (CLUSTER / "docker" / f"Dockerfile.{flavour}").read_text()
        bases = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
        assert bases == [f"rayproject/ray:{ray}-py311-{flavour}"], bases
        tag = re.search(r"-t (\S+)", text).group(1)
        assert tag.endswith(f":ray{ray}-{flavour}")
    assert '".[gen]"' in (CLUSTER / "docker" / "Dockerfile.gpu").read_text()


def anim_commands() -> list[tuple[str, list[str]]]:
    """Every command line the cluster files run: entrypoints and container commands."""
    out = []
    for name, doc in documents():
        if doc["kind"] == "RayJob":
            out.append((name, shlex.split(doc["spec"]["entrypoint"])))
        elif doc["kind"] == "RayCronJob":
            out.append((name, shlex.split(doc["spec"]["jobTemplate"]["entrypoint"])))
        elif doc["kind"] in ("Deployment", "CronJob"):
            pod = doc["spec"]["template"] if doc["kind"] == "Deployment" else \
                doc["spec"]["jobTemplate"]["spec"]["template"]
            out += [(name, c["command"]) for c in pod["spec"]["containers"] if "command" in c]
    return out


def accepts(argv: list[str]) -> str | None:
    """None when the ``anim`` CLI parses ``argv`` (program name first) into a command and its
    options, else click's message. Nothing runs: the command is parsed, not invoked."""
    import typer

    from pipeline.cli import app

    assert argv[0] == "anim", argv
    cmd = typer.main.get_command(app)  # typer's own click: its classes, not the click package's
    ctx, args = None, list(argv[1:])
    try:
        # A group's name, then its command's (the files give no group options before it).
        while hasattr(cmd, "get_command"):
            ctx = cmd.context_class(cmd, info_name=ctx.info_name if ctx else "anim", parent=ctx)
            if not args or cmd.get_command(ctx, args[0]) is None:
                return f"No such command {args[0] if args else ''!r}"
            name, args = args[0], args[1:]
            cmd = cmd.get_command(ctx, name)
        cmd.make_context(cmd.name, args, parent=ctx)
    except Exception as exc:  # a usage error of typer's click: the message the CLI would print
        if not hasattr(exc, "format_message"):
            raise
        return exc.format_message()
    return None


def test_every_entrypoint_and_command_is_an_anim_invocation_the_cli_accepts():
    commands = anim_commands()
    assert {argv[1] for _, argv in commands} >= {"render", "nightly", "serve"}
    for where, argv in commands:
        assert accepts(argv) is None, (where, argv, accepts(argv))
    # The check can fail: an option the command does not have, or a command that does not exist.
    assert "No such option" in accepts(["anim", "nightly", "x.toml", "--dryrun"])
    assert "No such command" in accepts(["anim", "nighty", "x.toml"])


def test_the_ray_up_config_validates_against_rays_own_schema():
    schema = json.loads((files("ray.autoscaler") / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(config)
    assert config["provider"]["type"] == "local" and config["provider"]["worker_ips"]
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_TOKEN_PATH" in c for c in starts if "ray start" in c)
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    bad = dict(config, max_worker=3)  # the schema is closed at the top: a misspelt key fails
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(bad)
