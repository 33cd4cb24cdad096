#!/usr/bin/env python3
"""Prints, as JSON, the arguments and environment a manifest gives the data
plane container of its DaemonSet (or, with a second argument `issuer`, the
issuer container of its Deployment): {"args": [...], "env": {...}}, with
envFrom ConfigMaps (defined in the same manifest) and env entries resolved.
The manifest test runs `dataplane <args> --check-config` with that
environment, so the manifest can never name a flag or a value the binary
rejects."""
import json, sys

import yaml  # PyYAML, installed with kubernetes-validate

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
configmaps = {(d["metadata"].get("namespace"), d["metadata"]["name"]): d.get("data", {})
              for d in docs if d["kind"] == "ConfigMap"}
want = sys.argv[2] if len(sys.argv) > 2 else "dataplane"
if want == "rbac":
    # Every RBAC rule, with the role it belongs to and who is bound to it.
    bound = {}
    for d in docs:
        if d["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            bound.setdefault((d["roleRef"]["kind"], d["roleRef"]["name"]), []).extend(
                s["name"] for s in d.get("subjects", []))
    print(json.dumps([{"kind": d["kind"], "name": d["metadata"]["name"], "subjects": bound.get((d["kind"], d["metadata"]["name"]), []),
                       "rules": d.get("rules", [])} for d in docs if d["kind"] in ("Role", "ClusterRole")]))
    sys.exit(0)
kind = "Deployment" if want == "issuer" else "DaemonSet"
ds = next(d for d in docs if d["kind"] == kind)
container = next(c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == want)
env = {}
for src in container.get("envFrom", []):
    ref = src["configMapRef"]["name"]
    env.update(configmaps[(ds["metadata"].get("namespace"), ref)])
for e in container.get("env", []):
    if "value" in e:
        env[e["name"]] = e["value"]
    elif "fieldRef" in e.get("valueFrom", {}):
        # Filled in by the kubelet (the downward API); any value will do for
        # checking the configuration.
        env[e["name"]] = "from-" + e["valueFrom"]["fieldRef"]["fieldPath"]
print(json.dumps({"args": container.get("args", []), "env": env}))
