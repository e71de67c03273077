#!/usr/bin/env python3
"""Verifies the Helm chart with real Helm (helm-python-sdk: Helm's Go SDK, no
helm binary) and kubernetes-validate:

1. `helm lint --strict` finds no error or warning;
2. the chart renders with its default values and with ci/custom-values.yaml,
   and every rendered manifest passes `kubernetes-validate --strict`
   (kinds from other projects' CRDs, like ServiceMonitor, are checked
   structurally and reported as such);
3. values.schema.json accepts both value files and rejects bad values;
4. the CRDs under the chart's crds/ pass `kubernetes-validate --strict`;
5. examples/distcache-cluster.yaml validates against the CRD's openAPI schema,
   and invalid variants are rejected;
6. the rendered (Cluster)Role grants every rule of files/operator-rules.json
   (which a Rust test keeps equal to the operator's OPERATOR_RULES).

Exits non-zero with a message on the first failure.
"""

import json
import os
import subprocess
import sys
import tempfile

import helm_python as helm
import jsonschema
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(ROOT, "charts", "distcache-operator")
K8S_VERSION = "1.33.0"


def fail(msg):
    print(f"chart check FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def validate_docs(docs, label):
    """kubernetes-validate --strict on each document (one file each)."""
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, doc in enumerate(docs):
            if doc.get("apiVersion", "").startswith("monitoring.coreos.com/"):
                spec = doc.get("spec", {})
                if doc["kind"] == "PrometheusRule":
                    check_rules(spec, label)
                elif not spec.get("endpoints") or not spec.get("selector"):
                    fail(f"{label}: ServiceMonitor without endpoints/selector")
                print(f"  {label}: {doc['kind']} {doc['metadata']['name']}: "
                      "Prometheus Operator kind, checked structurally (no schema in kubernetes-validate)")
                continue
            path = os.path.join(tmp, f"{i:02d}-{doc['kind']}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(doc, f)
            files.append(path)
        if not files:
            fail(f"{label}: nothing to validate")
        r = subprocess.run(
            ["kubernetes-validate", "--strict", "-k", K8S_VERSION, *files],
            capture_output=True, text=True)
        out = (r.stdout + r.stderr).strip()
        if r.returncode != 0 or "ERROR" in out or "WARN" in out:
            fail(f"{label}: kubernetes-validate --strict:\n{out}")
        print(f"  {label}: {len(files)} manifests pass kubernetes-validate --strict (k8s {K8S_VERSION})")


def metric_names(expr):
    """The metric names an expression reads (distcache's and the kubelet's)."""
    import re
    return set(re.findall(r"\b((?:distcache_[a-z_]+)|container_[a-z_]+|kube_[a-z_]+)\b", expr))


def check_rules(spec, label):
    """A PrometheusRule: every alert has an expr, a severity and a runbook
    section that exists in the README."""
    readme = open(os.path.join(ROOT, "README.md")).read().lower()
    rules = [r for g in spec.get("groups", []) for r in g.get("rules", [])]
    if not rules:
        fail(f"{label}: PrometheusRule without rules")
    for r in rules:
        if not r.get("alert") or not r.get("expr") or not r.get("labels", {}).get("severity"):
            fail(f"{label}: alert without name, expr or severity: {r}")
        anchor = r.get("annotations", {}).get("runbook", "").split("#")[-1]
        if not anchor or f"alert-{r['alert'].lower()}" != anchor or f"alert: {r['alert'].lower()}" not in readme:
            fail(f"{label}: alert {r['alert']} has no runbook section in README")
    print(f"  {label}: PrometheusRule with {len(rules)} alerts, each with a README runbook")


def check_dashboard(docs, label):
    """The dashboard ConfigMap holds valid Grafana JSON whose queries read
    only metrics distcache exports (tests/metric_names.rs checks them
    against a live node) or standard kubelet/kube-state-metrics ones."""
    cms = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    if len(cms) != 1:
        fail(f"{label}: expected one dashboard ConfigMap")
    if cms[0]["metadata"]["labels"].get("grafana_dashboard") != "1":
        fail(f"{label}: the dashboard ConfigMap lacks the grafana_dashboard label")
    board = json.loads(cms[0]["data"]["distcache.json"])
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    if len(board["panels"]) < 6 or not exprs:
        fail(f"{label}: the dashboard has too few panels")
    names = set().union(*(metric_names(e) for e in exprs))
    if not any(n.startswith("distcache_node_") for n in names):
        fail(f"{label}: the dashboard reads no distcache metric")
    print(f"  {label}: dashboard with {len(board['panels'])} panels reading {len(names)} metrics")


def render(chart, values, label):
    manifests = chart.render(values, name="distcache-operator", namespace="distcache-system",
                             is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            if "kubectl apply" not in text:
                fail(f"{label}: NOTES.txt does not tell the next step")
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    kinds = sorted(d["kind"] for d in docs)
    print(f"  {label}: rendered {kinds}")
    return docs


def check_rbac(docs, label, namespaced):
    want = json.load(open(os.path.join(CHART, "files", "operator-rules.json")))
    role_kind = "Role" if namespaced else "ClusterRole"
    roles = [d for d in docs if d["kind"] == role_kind and not d["metadata"]["name"].endswith("leader-election")]
    if len(roles) != 1:
        fail(f"{label}: expected one {role_kind}, got {[d['metadata']['name'] for d in roles]}")
    granted = set()
    for rule in roles[0]["rules"]:
        for g in rule["apiGroups"]:
            for res in rule["resources"]:
                for v in rule["verbs"]:
                    granted.add((g, res, v))
    for rule in want:
        for g in rule["apiGroups"]:
            for res in rule["resources"]:
                for v in rule["verbs"]:
                    if (g, res, v) not in granted:
                        fail(f"{label}: {role_kind} lacks {v} on {g or 'core'}/{res}")
    bindings = [d for d in docs if d["kind"] == role_kind + "Binding"]
    if not bindings or bindings[0]["roleRef"]["name"] != roles[0]["metadata"]["name"]:
        fail(f"{label}: no {role_kind}Binding to the operator's role")
    print(f"  {label}: {role_kind} grants all {len(want)} operator rules")


def main():
    print("Helm chart checks (helm-python-sdk, Helm SDK "
          f"{helm.helm_sdk_version()}):")
    report = helm.lint(CHART, strict=True, kube_version="v" + K8S_VERSION)
    bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    if report.get("errors") or bad:
        fail(f"helm lint --strict: {report}")
    print(f"  helm lint --strict: {report.get('total_charts_linted')} chart, no warnings")

    chart = helm.Chart.load(CHART)
    custom = yaml.safe_load(open(os.path.join(CHART, "ci", "custom-values.yaml")))
    for values, label in ((None, "default values"), (custom, "ci/custom-values.yaml")):
        chart.validate_schema(values)
    for broken in ({"replicaCount": 0}, {"image": {"pullPolicy": "Sometimes"}}, {"typo": True}):
        try:
            chart.validate_schema(chart.merge_values(broken))
        except helm.HelmValuesError:
            continue
        fail(f"values.schema.json accepted {broken}")
    print("  values.schema.json: accepts both value files, rejects 3 bad ones")

    docs = render(chart, None, "default values")
    validate_docs(docs, "default values")
    check_rbac(docs, "default values", namespaced=False)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    if env.get("DISTCACHE_OPERATOR_LEADER_ELECTION") != "true":
        fail("leader election is not on by default")

    docs = render(chart, custom, "ci/custom-values.yaml")
    validate_docs(docs, "ci/custom-values.yaml")
    check_dashboard(docs, "ci/custom-values.yaml")
    check_rbac(docs, "ci/custom-values.yaml", namespaced=True)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    if dep["spec"]["replicas"] != 2:
        fail("replicaCount not applied")
    if not any(d["kind"] == "ServiceMonitor" for d in docs):
        fail("ServiceMonitor not rendered")

    crd_files = [os.path.join(CHART, "crds", f) for f in sorted(os.listdir(os.path.join(CHART, "crds")))]
    crds = [doc for f in crd_files for doc in yaml.safe_load_all(open(f)) if doc]
    validate_docs(crds, "chart crds/")

    crd = crds[0]
    version = next(v for v in crd["spec"]["versions"] if v["served"])
    schema = version["schema"]["openAPIV3Schema"]
    sample_path = os.path.join(ROOT, "examples", "distcache-cluster.yaml")
    sample = yaml.safe_load(open(sample_path))
    if sample["apiVersion"] != f"{crd['spec']['group']}/{version['name']}" or sample["kind"] != crd["spec"]["names"]["kind"]:
        fail("the sample's apiVersion/kind are not the CRD's")
    try:
        jsonschema.validate(sample, schema)
    except jsonschema.ValidationError as e:
        fail(f"examples/distcache-cluster.yaml does not match the CRD schema: {e.message}")
    for path, value in ((("spec", "replicas"), "three"), (("spec", "storage", "fsync"), "yes"),
                        (("spec", "storage", "size"), 5)):
        broken = json.loads(json.dumps(sample))
        node = broken
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
        try:
            jsonschema.validate(broken, schema)
        except jsonschema.ValidationError:
            continue
        fail(f"the CRD schema accepted {'.'.join(path)} = {value!r}")
    print("  examples/distcache-cluster.yaml validates against the CRD schema; 3 broken variants rejected"
          " (CEL rules are the API server's; the operator's reconcile tests cover them)")
    print("chart checks passed")


if __name__ == "__main__":
    main()
