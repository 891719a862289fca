"""Validate the Kubernetes manifests in k8s/ without a cluster (CI runs it: tests/test_k8s.py).

    python k8s/validate.py [FILE.yaml ...]     # default: every k8s/*.yaml; one line per problem, exit 1

Needs the pinned validators of the ``[k8s]`` extra (``pip install -e '.[k8s]'``):
  * every file parses as YAML; core kinds (the PersistentVolumeClaim) against the Kubernetes JSON
    schemas of ``kubernetes-validate``, strict (an unknown field is an error);
  * a ``TrainJob`` against Kubeflow Trainer's published API models (``kubeflow-trainer-api``) and a
    ``PyTorchJob`` against the training operator's (``kubeflow-training``): each must survive a
    trip through its model unchanged, so a misspelt or misplaced field is an error, not dropped;
    plus the rules their admission webhooks and CRDs add (names, replica counts, container name);
  * every pod the jobs make (the TrainJob's from its trainer and runtime patch) as a core Pod,
    strict, and the settings these jobs rely on: the shared ReadWriteMany claim mounted at
    /workspace/data and /workspace/runs, terminationGracePeriodSeconds >= 60, one rank per GPU,
    no Istio sidecar;
  * the container command: torchrun's part parsed by torchrun's own parser, and our flags by
    train_ddp.py's (the same checks as a real start, at every world size the job can have), with a
    fixed --out-dir of its own and --resume auto.
No cluster ran these manifests here; this proves they are well-formed, not that a cluster runs them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable

K8S_VERSION = "1.37.0"  # the newest schemas kubernetes-validate (pinned) ships
SCRIPT = "/app/train_ddp.py"  # where docker/Dockerfile installs the training script
DATA, RUNS = "/workspace/data", "/workspace/runs"
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- generic checks
def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where ``b`` (the model's version) differs from ``a`` (the manifest)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: unknown field (the API model dropped it)" for k in a if k not in b]
        out += [f"{path}.{k}: added by the model" for k in b if k not in a]
        return out + [d for k in a if k in b for d in differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} became {b!r} in the API model"]


def round_trip(doc: dict, load: Callable[[dict], Any], dump: Callable[[Any], dict]) -> list[str]:
    try:
        model = load(json.loads(json.dumps(doc)))
    except Exception as exc:  # the model's own validation (types, required fields)
        return [f"rejected by the API model: {' '.join(str(exc).split())[:400]}"]
    return differences(doc, dump(model))


def core_schema(doc: dict) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except Exception as exc:
        return [f"{doc.get('kind')} against the Kubernetes {K8S_VERSION} schema: {' '.join(str(exc).split())[:400]}"]
    return []


# ----------------------------------------------------------------------------- the two job kinds
def trainjob_model(doc: dict) -> list[str]:
    """Kubeflow Trainer's pydantic model of the TrainJob (kubeflow-trainer-api)."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    return round_trip(doc, TrainerV1alpha1TrainJob.from_dict, lambda m: m.to_dict())


def pytorchjob_model(doc: dict) -> list[str]:
    """The training operator's OpenAPI model of the PyTorchJob (kubeflow-training), read with its
    own client's deserializer; the pod templates become the kubernetes client's models."""
    from kubeflow.training.api_client import ApiClient

    client = ApiClient()
    return round_trip(doc, lambda d: client._ApiClient__deserialize(d, "KubeflowOrgV1PyTorchJob"),
                      client.sanitize_for_serialization)


def trainjob(doc: dict) -> tuple[list[str], list[tuple[dict, dict, list[str]]], list[int]]:
    """Problems; the pods (pod, container, command) it makes; its world size(s)."""
    problems = trainjob_model(doc)
    spec, trainer = doc.get("spec", {}), doc.get("spec", {}).get("trainer", {})
    if spec.get("runtimeRef", {}).get("name") != "torch-distributed":
        problems.append("runtimeRef: expected the torch-distributed ClusterTrainingRuntime")
    for key in ("numNodes", "numProcPerNode"):
        if not isinstance(trainer.get(key), int) or trainer[key] < 1:
            problems.append(f"spec.trainer.{key} must be an integer >= 1 (CRD), got {trainer.get(key)!r}")
    patches = [rj for p in spec.get("runtimePatches", [])
               for rj in p.get("trainingRuntimeSpec", {}).get("template", {}).get("spec", {}).get("replicatedJobs", [])
               if rj.get("name") == "node"]
    if len(patches) != 1:
        return problems + ["runtimePatches: expected one patch of the `node` replicated job"], [], []
    template = patches[0].get("template", {}).get("spec", {}).get("template", {})
    pod_spec = {k: v for k, v in template.get("spec", {}).items() if k != "containers"}
    container = {"name": "node", "image": trainer.get("image"), "command": trainer.get("command", []),
                 "args": trainer.get("args", []), "env": trainer.get("env", []),
                 "resources": trainer.get("resourcesPerNode", {})}
    for patch in template.get("spec", {}).get("containers", []):
        if patch.get("name") == "node":
            container.update({k: v for k, v in patch.items() if k != "name"})
    metadata = {"name": doc["metadata"]["name"], **template.get("metadata", {})}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": {**pod_spec, "containers": [container]}}
    command = [*container["command"], *container["args"]]
    problems += one_rank_per_gpu("spec.trainer.numProcPerNode", trainer.get("numProcPerNode"), container)
    sizes = [trainer.get("numNodes", 1) * trainer.get("numProcPerNode", 1)]
    return problems, [(pod, container, command)], sizes


def one_rank_per_gpu(field: str, nproc: Any, container: dict) -> list[str]:
    gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    if gpus is not None and str(nproc) != str(gpus):
        return [f"{field} is {nproc} but each node has {gpus} GPU(s): one rank per GPU"]
    return []


def pytorchjob(doc: dict) -> tuple[list[str], list[tuple[dict, dict, list[str]]], list[int]]:
    """The same for a training-operator PyTorchJob, with its admission webhook's rules
    (kubeflow/training-operator release-1.9, pkg/webhooks/pytorch/pytorchjob_webhook.go)."""
    problems = pytorchjob_model(doc)
    spec = doc.get("spec", {})
    replicas = spec.get("pytorchReplicaSpecs", {})
    elastic = spec.get("elasticPolicy")
    if not set(replicas) <= {"Master", "Worker"} or not replicas:
        problems.append(f"pytorchReplicaSpecs: Master and/or Worker only, got {sorted(replicas)}")
    if "Master" in replicas and replicas["Master"].get("replicas") != 1:
        problems.append("pytorchReplicaSpecs.Master.replicas must be 1")
    if "Worker" in replicas and replicas["Worker"].get("replicas", 1) < 1:
        problems.append("pytorchReplicaSpecs.Worker.replicas must be at least 1")
    if elastic is not None and "Worker" not in replicas:
        problems.append("elasticPolicy needs a Worker replica spec")
    if elastic is not None and "nProcPerNode" in elastic and "nprocPerNode" in spec:
        problems.append("elasticPolicy.nProcPerNode must not be used with nprocPerNode")
    pods = []
    for role, replica in sorted(replicas.items()):
        template = replica.get("template", {})
        containers = template.get("spec", {}).get("containers", [])
        if not any(c.get("name") == "pytorch" for c in containers):
            problems.append(f"{role}: needs a container named `pytorch` (the operator's default container)")
        problems += [f"{role}: container {c.get('name')} has no image" for c in containers if not c.get("image")]
        main = next((c for c in containers if c.get("name") == "pytorch"), {})
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{doc['metadata']['name']}-{role.lower()}",
                                                              **template.get("metadata", {})},
               "spec": template.get("spec", {})}
        pods.append((pod, main, [*main.get("command", []), *main.get("args", [])]))
        problems += one_rank_per_gpu("nprocPerNode", spec.get("nprocPerNode", "1"), main)
    nproc = int(spec.get("nprocPerNode", "1")) if str(spec.get("nprocPerNode", "1")).isdigit() else 1
    if elastic is not None:
        low, high = elastic.get("minReplicas", 1), elastic.get("maxReplicas", 1)
        if not 1 <= low <= replicas.get("Worker", {}).get("replicas", 1) <= high:
            problems.append(f"elasticPolicy: need 1 <= minReplicas ({low}) <= Worker.replicas <= maxReplicas ({high})")
        sizes = [n * nproc for n in range(low, high + 1)]
    else:
        sizes = [sum(r.get("replicas", 1) for r in replicas.values()) * nproc]
    return problems, pods, sizes


# ----------------------------------------------------------------------------- what our job needs
def training_flags(command: list[str], launcher_rules: bool) -> tuple[list[str], list[str]]:
    """(problems, train_ddp.py's flags) of a container command: `python SCRIPT FLAGS` or
    `torchrun SCRIPT FLAGS` (torchrun's own parser; no options of its own, so the operator's
    PET_* settings rule)."""
    if command[:1] == ["torchrun"] or command[:3] == ["python", "-m", "torch.distributed.run"]:
        from torch.distributed.run import get_args_parser

        rest = command[1:] if command[0] == "torchrun" else command[3:]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parsed = get_args_parser().parse_args(rest)
        except SystemExit:
            return [f"torchrun rejects {rest}: {err.getvalue().strip().splitlines()[-1:]}"], []
        problems = [f"torchrun options {rest[:rest.index(parsed.training_script)]} would override the launcher's "
                    f"PET_* settings"] if launcher_rules and rest[0] != parsed.training_script else []
        script, flags = parsed.training_script, list(parsed.training_script_args)
    elif command[:1] in (["python"], ["python3"]) and len(command) > 1:
        problems, script, flags = [], command[1], command[2:]
    else:
        return [f"command {command[:3]} is neither `python {SCRIPT}` nor `torchrun {SCRIPT}`"], []
    if script != SCRIPT:
        problems.append(f"runs {script}, but the image has the training script at {SCRIPT}")
    return problems, flags


def check_flags(flags: list[str], sizes: list[int]) -> tuple[list[str], str | None]:
    """train_ddp.py's own parsing and checks at each world size; (problems, the --out-dir)."""
    sys.path.insert(0, str(HERE.parent))  # this checkout's mnist_dist
    from mnist_dist.entry import parse_train_args
    from mnist_dist.errors import UserError

    problems, cfg = [], None
    for size in sizes:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                cfg = parse_train_args(flags, world_size=size)
        except SystemExit:
            return [f"train_ddp.py rejects {flags}: {err.getvalue().strip().splitlines()[-1:]}"], None
        except UserError as exc:
            problems.append(f"train_ddp.py at world size {size}: {exc}")
    if cfg is None:
        return problems, None
    if "--out-dir" not in flags or not cfg.out_dir.startswith(RUNS + "/"):
        problems.append(f"needs a fixed --out-dir under {RUNS} (got {cfg.out_dir}), so that a restart finds it")
    if cfg.resume != "auto":
        problems.append("needs --resume auto, so that a restarted pod continues from the newest checkpoint")
    if cfg.data_dir != DATA:
        problems.append(f"needs --data-dir {DATA} (the shared volume), got {cfg.data_dir}")
    return problems, cfg.out_dir


def check_pod(pod: dict, container: dict, claims: dict[str, list[str]]) -> list[str]:
    problems = core_schema(pod)
    spec = pod["spec"]
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if not isinstance(grace, int) or grace < 60:
        problems.append("terminationGracePeriodSeconds must be >= 60: time for the stop checkpoint")
    if pod["metadata"].get("annotations", {}).get("sidecar.istio.io/inject") != "false":
        problems.append('needs the annotation sidecar.istio.io/inject: "false" (a sidecar outlives training)')
    volumes = {v.get("name"): v for v in spec.get("volumes", [])}
    mounts = {m.get("mountPath"): m for m in container.get("volumeMounts", [])}
    problems += [f"volumeMount {m.get('name')} has no volume" for m in mounts.values() if m.get("name") not in volumes]
    for path in (DATA, RUNS):
        claim = volumes.get(mounts.get(path, {}).get("name"), {}).get("persistentVolumeClaim", {}).get("claimName")
        if claim is None:
            problems.append(f"{path} must be mounted from the shared PersistentVolumeClaim")
        elif claim not in claims:
            problems.append(f"{path}: claim {claim} is not defined in k8s/")
        elif "ReadWriteMany" not in claims[claim]:
            problems.append(f"{path}: claim {claim} must be ReadWriteMany (pods on several nodes share it)")
    if "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {}):
        problems.append("no GPU resources (limits nvidia.com/gpu) per node")
    return problems


def check_job(doc: dict, job: Callable, claims: dict, out_dirs: dict[str, str], where: str) -> list[str]:
    found, pods, sizes = job(doc)
    if not DNS1035.match(doc["metadata"]["name"]) or len(doc["metadata"]["name"]) > 63:
        found.append("metadata.name must be an RFC 1035 DNS label of at most 63 characters")
    for pod, container, command in pods:
        found += check_pod(pod, container, claims)
        command_problems, flags = training_flags(command, launcher_rules=True)
        flag_problems, out_dir = check_flags(flags, sizes) if flags else ([], None)
        found += command_problems + flag_problems
        if out_dir and out_dirs.setdefault(out_dir, where) != where:
            found.append(f"--out-dir {out_dir} is also {out_dirs[out_dir]}'s: two jobs would share checkpoints")
    return found


JOBS = {("trainer.kubeflow.org/v1alpha1", "TrainJob"): (trainjob, trainjob_model),
        ("kubeflow.org/v1", "PyTorchJob"): (pytorchjob, pytorchjob_model)}


def validate(paths: list[Path]) -> list[str]:
    """Every problem in these files (and across them), each prefixed with its file and object."""
    docs, problems = [], []
    for path in paths:
        import yaml

        try:
            loaded = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as exc:
            problems.append(f"{path.name}: not YAML: {' '.join(str(exc).split())}")
            continue
        for doc in loaded:
            if not isinstance(doc, dict) or not all(k in doc for k in ("apiVersion", "kind")) \
                    or not doc.get("metadata", {}).get("name"):
                problems.append(f"{path.name}: a document without apiVersion, kind and metadata.name")
            else:
                docs.append((path, doc))
    claims = {d["metadata"]["name"]: d.get("spec", {}).get("accessModes", [])
              for _, d in docs if d["kind"] == "PersistentVolumeClaim"}
    out_dirs: dict[str, str] = {}
    for path, doc in docs:
        where = f"{path.name}: {doc['kind']} {doc['metadata']['name']}"
        job, model = JOBS.get((doc["apiVersion"], doc["kind"]), (None, None))
        if job is None:
            problems += [f"{where}: {p}" for p in core_schema(doc)]
            continue
        try:
            found = check_job(doc, job, claims, out_dirs, where)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:  # a shape no model has
            found = [*model(doc), f"malformed ({type(exc).__name__}: {exc})"]
        problems += [f"{where}: {p}" for p in dict.fromkeys(found)]  # each once (Master and Worker alike)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="default: every k8s/*.yaml")
    args = parser.parse_args(argv)
    paths = args.files or sorted(HERE.glob("*.yaml"))
    problems = validate(paths)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print(f"{len(paths)} file(s) valid: {', '.join(p.name for p in paths)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
