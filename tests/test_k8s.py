"""The Kubernetes manifests in k8s/ (no cluster here): k8s/validate.py passes them, and fails each
kind of mistake it claims to catch — schema, API model, webhook rule, command line, pod settings."""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
from typing import Any, Callable

import pytest

from conftest import REPO, python

for package in ("yaml", "kubernetes_validate", "kubeflow_trainer_api", "kubeflow.training"):
    pytest.importorskip(package, reason="the [k8s] extra is not installed: pip install -e '.[k8s]'")
import yaml  # noqa: E402

K8S = REPO / "k8s"
_spec = importlib.util.spec_from_file_location("k8s_validate", K8S / "validate.py")
validate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(validate)


def manifest(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def test_every_manifest_is_valid():
    proc = python(str(K8S / "validate.py"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "4 file(s) valid: pvc.yaml, pytorchjob-elastic.yaml, pytorchjob.yaml, trainjob.yaml" in proc.stdout
    kinds = sorted((d["apiVersion"], d["kind"]) for f in K8S.glob("*.yaml") for d in yaml.safe_load_all(f.read_text()))
    assert kinds == [("kubeflow.org/v1", "PyTorchJob"), ("kubeflow.org/v1", "PyTorchJob"),
                     ("trainer.kubeflow.org/v1alpha1", "TrainJob"), ("v1", "PersistentVolumeClaim")]


def test_what_the_jobs_promise():
    """The settings item by item, read from the manifests themselves."""
    claim = manifest("pvc.yaml")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    train = manifest("trainjob.yaml")["spec"]
    assert train["runtimeRef"]["name"] == "torch-distributed" and train["trainer"]["numNodes"] == 2
    assert train["trainer"]["command"] == ["torchrun", "/app/train_ddp.py"]  # torchrun reads the PET_* values
    master = manifest("pytorchjob.yaml")["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    assert master["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert master["spec"]["containers"][0]["command"] == ["python", "/app/train_ddp.py"]  # already a rank
    elastic = manifest("pytorchjob-elastic.yaml")["spec"]["elasticPolicy"]
    assert (elastic["minReplicas"], elastic["maxReplicas"], elastic["rdzvBackend"]) == (1, 2, "c10d")
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and re.search(r"^COPY .*\btrain_ddp\.py \./$", dockerfile, re.M), \
        "the manifests run /app/train_ddp.py: the image must have it there"


def pod(doc: dict, role: str = "Master") -> dict:
    return doc["spec"]["pytorchReplicaSpecs"][role]["template"]


def container(doc: dict, role: str = "Master") -> dict:
    return pod(doc, role)["spec"]["containers"][0]


def trainer_pod(doc: dict) -> dict:
    return doc["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]


def trainer_container(doc: dict) -> dict:
    return trainer_pod(doc)["spec"]["containers"][0]


def set_arg(args: list[str], flag: str, value: str | None) -> None:
    i = args.index(flag)
    if value is None:
        del args[i:i + 2]
    else:
        args[i + 1] = value


MISTAKES: dict[str, tuple[str, Callable[[dict], Any], str]] = {
    "misspelt TrainJob field": ("trainjob.yaml", lambda d: d["spec"]["trainer"].update(numNode=3),
                                ".spec.trainer.numNode: unknown field"),
    "misplaced field in the runtime patch": (
        "trainjob.yaml", lambda d: trainer_pod(d)["spec"].update(restartPolicy="Never"),
        "restartPolicy: unknown field"),
    "TrainJob name": ("trainjob.yaml", lambda d: d["metadata"].update(name="MNIST_dist"), "RFC 1035"),
    "unknown training flag": ("trainjob.yaml", lambda d: d["spec"]["trainer"]["args"].append("--epoch"),
                              "train_ddp.py rejects"),
    "torchrun options over PET_*": ("trainjob.yaml",
                                    lambda d: d["spec"]["trainer"]["command"].insert(1, "--standalone"),
                                    "would override the launcher's PET_* settings"),
    "short grace period": ("trainjob.yaml", lambda d: trainer_pod(d)["spec"].update(terminationGracePeriodSeconds=30),
                           "terminationGracePeriodSeconds must be >= 60"),
    "mount of no volume": ("trainjob.yaml", lambda d: trainer_container(d)["volumeMounts"][0].update(
        name="data"), "volumeMount data has no volume"),
    "ranks and GPUs disagree": ("trainjob.yaml", lambda d: d["spec"]["trainer"].update(numProcPerNode=2),
                                "numProcPerNode is 2 but each node has 1 GPU(s)"),
    "container not named pytorch": ("pytorchjob.yaml", lambda d: container(d).update(name="main"),
                                    "needs a container named `pytorch`"),
    "two masters": ("pytorchjob.yaml", lambda d: d["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2),
                    "Master.replicas must be 1"),
    "misspelt container field": ("pytorchjob.yaml", lambda d: container(d).update(
        volumeMount=[]), "volumeMount: unknown field"),
    "wrong field type": ("pytorchjob.yaml", lambda d: pod(d)["spec"].update(terminationGracePeriodSeconds="long"),
                         "rejected by the API model"),
    "Istio sidecar": ("pytorchjob.yaml", lambda d: pod(d, "Worker")["metadata"]["annotations"].clear(),
                      "sidecar.istio.io/inject"),
    "no GPU": ("pytorchjob.yaml", lambda d: container(d)["resources"]["limits"].pop("nvidia.com/gpu"),
               "no GPU resources"),
    "script not in the image": ("pytorchjob.yaml", lambda d: container(d)["command"].__setitem__(
        1, "/app/train.py"), "the image has the training script at /app/train_ddp.py"),
    "no --resume auto": ("pytorchjob.yaml", lambda d: set_arg(container(d)["args"], "--resume", None),
                         "needs --resume auto"),
    "batch the world size does not divide": (
        "pytorchjob-elastic.yaml",
        lambda d: container(d, "Worker")["args"].extend(["--batch-size", "255"]),
        "at world size 2: --batch-size 255"),
    "replicas as text": ("pytorchjob.yaml",
                         lambda d: d["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas="two"),
                         "rejected by the API model"),
    "elastic range": ("pytorchjob-elastic.yaml", lambda d: d["spec"]["elasticPolicy"].update(minReplicas=3),
                      "minReplicas (3) <= Worker.replicas"),
    "elastic without workers": ("pytorchjob-elastic.yaml", lambda d: d["spec"]["pytorchReplicaSpecs"].update(
        Master=d["spec"]["pytorchReplicaSpecs"].pop("Worker")), "elasticPolicy needs a Worker replica spec"),
    "claim not shared": ("pvc.yaml", lambda d: d["spec"].update(accessModes=["ReadWriteOnce"]),
                         "must be ReadWriteMany"),
    "misspelt PVC field": ("pvc.yaml", lambda d: d["spec"].update(accesModes=["ReadWriteMany"]),
                           "PersistentVolumeClaim against the Kubernetes 1.37.0 schema"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_each_mistake_is_caught(mistake, tmp_path):
    name, change, expected = MISTAKES[mistake]
    for other in K8S.glob("*.yaml"):
        shutil.copy(other, tmp_path / other.name)
    doc = copy.deepcopy(manifest(name))
    change(doc)
    (tmp_path / name).write_text(yaml.safe_dump(doc, sort_keys=False))
    problems = validate.validate(sorted(tmp_path.glob("*.yaml")))
    assert any(expected in p for p in problems), f"{expected!r} not in:\n" + "\n".join(problems)
    assert all(re.match(r"^[\w.-]+\.yaml: ", p) for p in problems), "each problem names its file"


def test_two_jobs_sharing_a_run_directory_are_caught(tmp_path):
    for other in K8S.glob("*.yaml"):
        shutil.copy(other, tmp_path / other.name)
    doc = manifest("pytorchjob-elastic.yaml")
    args = container(doc, "Worker")["args"]
    set_arg(args, "--out-dir", "/workspace/runs/mnist-dist-pytorchjob")
    (tmp_path / "pytorchjob-elastic.yaml").write_text(yaml.safe_dump(doc))
    problems = validate.validate(sorted(tmp_path.glob("*.yaml")))
    assert any("two jobs would share checkpoints" in p for p in problems), problems


def test_unparsable_yaml_is_one_line(tmp_path):
    (tmp_path / "broken.yaml").write_text("kind: [PersistentVolumeClaim\n")
    proc = python(str(K8S / "validate.py"), str(tmp_path / "broken.yaml"), timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: broken.yaml: not YAML"), proc.stderr
    assert "Traceback" not in proc.stderr
