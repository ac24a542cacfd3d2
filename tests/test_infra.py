"""infra/: every Kubernetes manifest validated against the real schemas (KubeRay's CRDs for RayJob,
RayCluster and RayCronJob; kubernetes-validate for core kinds), and the nightly submission logic."""

from __future__ import annotations

import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "infra" / "k8s" / "crds"  # vendored, unmodified (see its README)
SHARED_CRDS = ROOT.parent / "shared" / "kuberay-crds"
MANIFESTS = sorted(p for p in (ROOT / "infra" / "k8s").rglob("*.yaml") if CRDS not in p.parents)
KUBE_VERSION = "1.31.0"


def _crd_schema(kind: str, version: str) -> dict:
    for path in CRDS.glob("ray.io_*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            return next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version)
    raise AssertionError(f"no CRD for {kind}")


def _documents() -> list[tuple[Path, dict]]:
    return [(p, d) for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]


def test_there_are_manifests_for_the_nightly_scan():
    kinds = {d["kind"] for _, d in _documents()}
    assert {"RayJob", "RayCronJob", "CronJob", "Role", "RoleBinding", "ServiceAccount"} <= kinds


@pytest.mark.skipif(not SHARED_CRDS.exists(), reason="no ../shared/kuberay-crds on this machine")
def test_the_vendored_crds_are_the_shared_ones_unmodified():
    for path in CRDS.glob("ray.io_*.yaml"):
        assert path.read_bytes() == (SHARED_CRDS / path.name).read_bytes(), path.name


@pytest.mark.parametrize("path_doc", _documents(), ids=lambda pd: f"{pd[0].name}:{pd[1]['kind']}")
def test_manifest_is_valid_against_its_schema(path_doc):
    path, doc = path_doc
    if doc["kind"] == "Kustomization":
        for res in doc["resources"]:
            assert (path.parent / res).exists()
        for gen in doc.get("configMapGenerator", []):
            assert all((path.parent / f).exists() for f in gen["files"])
        return
    group, _, version = doc["apiVersion"].rpartition("/")
    if group == "ray.io":
        jsonschema.validate(doc, _crd_schema(doc["kind"], version))
    else:
        import kubernetes_validate

        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_a_broken_manifest_is_caught():
    """The validation can fail: a RayJob with a misspelt field type and a CronJob with an unknown field."""
    rayjob = next(d for _, d in _documents() if d["kind"] == "RayJob")
    bad = {**rayjob, "spec": {**rayjob["spec"], "shutdownAfterJobFinishes": "yes"}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _crd_schema("RayJob", "v1"))
    import kubernetes_validate

    cron = next(d for _, d in _documents() if d["kind"] == "CronJob")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**cron, "spec": {**cron["spec"], "schedul": "x"}}, KUBE_VERSION, strict=True)


def test_the_nightly_rayjob_has_a_fixed_name_and_submission_id_per_night():
    docs = {d["kind"]: d for _, d in _documents()}
    rayjob, cron = docs["RayJob"], docs["CronJob"]
    assert rayjob["metadata"]["name"] == rayjob["spec"]["jobId"] == "melbatch-scan-yyyymmdd"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True and rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    assert "jobs/scan.py" in rayjob["spec"]["entrypoint"]
    script = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    # run the CronJob's substitution on the template: tonight's name and id, everything else unchanged
    template = (ROOT / "infra/k8s/scan/rayjob-scan.yaml").read_text()
    out = subprocess.run(["sed", "s/yyyymmdd/20261125/g"], input=template, capture_output=True, text=True,
                         check=True).stdout
    assert "sed \"s/yyyymmdd/${night}/g\"" in script and "kubectl create" in script
    night = yaml.safe_load(out)
    assert night["metadata"]["name"] == night["spec"]["jobId"] == "melbatch-scan-20261125"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    role = docs["Role"]["rules"][0]
    assert role["resources"] == ["rayjobs"] and "create" in role["verbs"] and "delete" not in role["verbs"]


def test_no_credentials_in_any_manifest():
    text = "\n".join(p.read_text() for p in MANIFESTS).lower()
    assert "aws_secret_access_key:" not in text and "secretkey" not in text


def test_the_cron_script_refuses_to_run_without_its_settings(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "infra/cron/melbatch-scan.sh")], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}, timeout=30)
    assert out.returncode != 0 and "RAY_ADDRESS" in out.stderr
