"""k8s/ manifests against KubeRay's CRD schemas (../shared/kuberay), offline: each validates, a broken copy
does not, the RayJob's entrypoint is a command the CLI accepts, and no secret value is written in them."""

from __future__ import annotations

import copy
import glob
import os
import shlex

import jsonschema
import pytest
import yaml

from batch_detect.commands.cli import build_parser
from conftest import ROOT, SHARED

KUBERAY = os.path.join(SHARED, "kuberay")
CRDS = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}


def manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "k8s", "*.yaml"))):
        with open(path) as fh:
            for doc in yaml.safe_load_all(fh):
                docs[f"{os.path.basename(path)}:{doc['kind']}"] = doc
    return docs


def strict(schema):
    """The API server's view of a structural schema for jsonschema: int-or-string accepts both, and an
    object with declared properties is closed unless it preserves unknown fields (so typos fail)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if schema.get("x-kubernetes-int-or-string"):
            schema.pop("type", None)
            schema.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    return schema


@pytest.fixture(scope="module")
def validators():
    if not os.path.isdir(KUBERAY):
        msg = f"{KUBERAY} is absent (CI provides ../shared/kuberay); manifest schema checks not run"
        print(f"SKIP: {msg}")
        pytest.skip(msg)
    out = {}
    for kind, name in CRDS.items():
        with open(os.path.join(KUBERAY, name)) as fh:
            crd = yaml.safe_load(fh)
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        out[kind] = jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))
    return out


def test_every_manifest_validates(validators):
    docs = manifests()
    kinds = {d["kind"] for d in docs.values()}
    assert {"RayJob", "RayCluster", "Secret"} <= kinds
    for name, doc in docs.items():
        if doc["kind"] in validators:
            assert doc["apiVersion"] == "ray.io/v1", name
            errors = [e.message for e in validators[doc["kind"]].iter_errors(doc)]
            assert not errors, (name, errors[:5])


def test_broken_manifests_fail(validators):
    job = next(d for d in manifests().values() if d["kind"] == "RayJob")
    misspelled = copy.deepcopy(job)
    misspelled["spec"]["shutdownAfterJobFinish"] = misspelled["spec"].pop("shutdownAfterJobFinishes")
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["ttlSecondsAfterFinished"] = "ten minutes"
    bad_container = copy.deepcopy(job)
    bad_container["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagee"] = "x"
    for broken in (misspelled, wrong_type, bad_container):
        assert list(validators["RayJob"].iter_errors(broken)), "a broken manifest passed validation"


def test_entrypoint_is_a_command_the_cli_accepts():
    job = next(d for d in manifests().values() if d["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "/app/jobs/detect.py"] and os.path.isfile(os.path.join(ROOT, "jobs", "detect.py"))
    args = build_parser().parse_args(["run", *argv[2:]])
    assert args.model.startswith("s3://") and args.output.startswith("s3://")
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0


def test_credentials_come_from_a_secret_reference():
    for name, doc in manifests().items():
        if doc["kind"] == "Secret":
            assert set(doc["stringData"].values()) == {"REPLACE_ME"}, name
            continue
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            for container in group["template"]["spec"]["containers"]:
                env = {e["name"]: e for e in container.get("env", [])}
                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    assert "secretKeyRef" in env[key]["valueFrom"] and "value" not in env[key], (name, key)
