"""infra/: every Kubernetes manifest validated against the real schemas (KubeRay's CRDs for RayJob,
RayCluster and RayCronJob; kubernetes-validate for core kinds), and the nightly submission logic."""

from __future__ import annotations

import functools
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


@functools.cache
def _crds() -> dict[str, dict]:
    """kind → CRD, parsed once (they are megabytes of YAML; libyaml's parser where there is one)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crds = (yaml.load(p.read_text(), Loader=loader) for p in CRDS.glob("ray.io_*.yaml"))
    return {crd["spec"]["names"]["kind"]: crd for crd in crds}


def _crd_schema(kind: str, version: str) -> dict:
    if kind not in _crds():
        raise AssertionError(f"no CRD for {kind}")
    return next(v["schema"]["openAPIV3Schema"] for v in _crds()[kind]["spec"]["versions"] if v["name"] == version)


@functools.cache
def _crd_validator(kind: str, version: str) -> jsonschema.protocols.Validator:
    schema = _crd_schema(kind, version)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _documents() -> list[tuple[Path, dict]]:
    return [(p, d) for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]


def test_there_are_manifests_for_the_nightly_scan_every_job_and_a_cluster():
    kinds = {d["kind"] for _, d in _documents()}
    assert {"RayJob", "RayCronJob", "RayCluster", "CronJob", "Role", "RoleBinding", "ServiceAccount"} <= kinds
    jobs = {d["metadata"]["labels"]["melbatch/job"]: d for _, d in _documents() if d["kind"] == "RayJob"}
    assert set(jobs) == {"featurize", "train", "classify", "scan"}
    for name, job in jobs.items():
        spec = job["spec"]
        assert f"/app/jobs/{name}.py" in spec["entrypoint"] and spec["shutdownAfterJobFinishes"] is True
        cluster = spec["rayClusterSpec"]
        assert cluster["authOptions"] == {"mode": "token"}
        groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
        assert set(groups) == {"cpu", "gpu"}
        gpu = groups["gpu"]["template"]["spec"]["containers"][0]
        assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1" and gpu["image"].endswith("-cuda")


def _ray_pin() -> str:
    req = (ROOT / "requirements.txt").read_text()
    return next(line.split("==")[1].split()[0] for line in req.splitlines() if line.startswith("ray["))


def test_every_cluster_runs_the_ray_version_the_tests_ran():
    """rayVersion in every manifest, and the image's Ray, are requirements.txt's pin (what CI tested)."""
    pin = _ray_pin()
    specs = []
    for _, d in _documents():
        spec = d.get("spec", {})
        specs += [s for s in (spec, spec.get("rayClusterSpec"), spec.get("jobTemplate", {}).get("rayClusterSpec"))
                  if isinstance(s, dict) and "rayVersion" in s]
    assert len(specs) >= 6 and {s["rayVersion"] for s in specs} == {pin}
    dockerfile = (ROOT / "infra/docker/Dockerfile").read_text()
    assert "-r /app/requirements.txt" in dockerfile and "COPY requirements.txt" in dockerfile
    assert "FROM ${PYTHON_IMAGE}" in dockerfile and "python:3.11" in dockerfile  # the Python the tests ran
    assert "download.pytorch.org/whl/cpu" in dockerfile and "whl/cu128" in dockerfile  # CPU and CUDA variants
    for need in ("wget", "ffmpeg"):  # KubeRay's probes; m4a/aac decoding
        assert need in dockerfile
    assert "ENV AWS_" not in dockerfile and "ARG AWS_" not in dockerfile  # no credentials in the image
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:][:5] == ["!requirements.txt", "!pyproject.toml", "!README.md", "!melbatch/",
                                                  "!jobs/"]


def test_the_ray_up_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((ROOT / "infra/ray-cluster.yaml").read_text())
    validate_config(config)  # what `ray up` checks first
    assert config["docker"]["image"].endswith(":0.1.0")
    for kind in ("head", "cpu", "gpu"):
        node = config["available_node_types"][kind]["node_config"]
        assert node["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")  # S3 access: the instance role
    assert config["available_node_types"]["gpu"]["docker"]["worker_image"].endswith("-cuda")
    text = (ROOT / "infra/ray-cluster.yaml").read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret" not in text.lower()
    with pytest.raises(jsonschema.ValidationError):
        validate_config({**config, "max_workers": "many"})


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
        _crd_validator(doc["kind"], version).validate(doc)
    else:
        import kubernetes_validate

        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_a_broken_manifest_is_caught():
    """The validation can fail: a RayJob with a misspelt field type and a CronJob with an unknown field."""
    rayjob = next(d for _, d in _documents() if d["kind"] == "RayJob")
    bad = {**rayjob, "spec": {**rayjob["spec"], "shutdownAfterJobFinishes": "yes"}}
    with pytest.raises(jsonschema.ValidationError):
        _crd_validator("RayJob", "v1").validate(bad)
    import kubernetes_validate

    cron = next(d for _, d in _documents() if d["kind"] == "CronJob")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**cron, "spec": {**cron["spec"], "schedul": "x"}}, KUBE_VERSION, strict=True)


def test_the_nightly_rayjob_has_a_fixed_name_and_submission_id_per_night():
    docs = {d["kind"]: d for _, d in _documents() if d.get("metadata", {}).get("labels", {}).get("melbatch/job")
            in (None, "scan")}
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
    for _, d in _documents():  # credentials come from the service account (workload identity) or a Secret
        if d["kind"] in ("RayJob", "RayCluster"):
            spec = d["spec"].get("rayClusterSpec", d["spec"])
            pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"]
                                                                  for g in spec["workerGroupSpecs"]]
            for pod in pods:
                assert pod["serviceAccountName"] == "melbatch-runner"
                env = pod["containers"][0].get("env", [])
                assert not [e for e in env if "AWS" in e["name"] and "value" in e]


def test_the_cron_script_refuses_to_run_without_its_settings(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "infra/cron/melbatch-scan.sh")], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}, timeout=30)
    assert out.returncode != 0 and "RAY_ADDRESS" in out.stderr


def test_the_image_build_context_is_enough_to_install_melbatch(tmp_path):
    """What .dockerignore lets into the build (and the Dockerfile copies) builds melbatch's wheel."""
    import shutil
    import sys
    import zipfile

    ctx = tmp_path / "ctx"
    for name in ("requirements.txt", "pyproject.toml", "README.md"):
        (ctx / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, ctx / name)
    for folder in ("melbatch", "jobs"):
        shutil.copytree(ROOT / folder, ctx / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                          str(tmp_path / "dist"), str(ctx)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("melbatch-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {p.relative_to(ROOT).as_posix() for p in (ROOT / "melbatch").rglob("*.py")} <= names
