#!/usr/bin/env python3
"""Prints, as JSON, the arguments and environment the DaemonSet in a manifest
gives the data plane container: {"args": [...], "env": {...}}, with envFrom
ConfigMaps (defined in the same manifest) and env entries resolved. The
manifest test runs `dataplane <args> --check-config` with that environment,
so the manifest can never name a flag or a value the binary rejects."""
import json, sys

import yaml  # PyYAML, installed with kubernetes-validate

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
configmaps = {(d["metadata"].get("namespace"), d["metadata"]["name"]): d.get("data", {})
              for d in docs if d["kind"] == "ConfigMap"}
ds = next(d for d in docs if d["kind"] == "DaemonSet")
container = next(c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "dataplane")
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
