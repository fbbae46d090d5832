"""Extract a CustomResourceDefinition's schema for one version as JSON, without its descriptions
(the structure only: types, properties, required fields, patterns). Run to refresh the files here:

    python tests/data/crds/extract.py CRD.yaml VERSION OUT.json

Sources of the files in this folder (see README.md): KEDA's config/crd/bases, the Prometheus
operator's example/prometheus-operator-crd, KServe's charts/kserve-crd-minimal.
"""

import json
import sys

import yaml


def strip(node):
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main(src: str, version: str, out: str) -> None:
    text = open(src).read()
    crd = next(d for d in yaml.safe_load_all(text) if d and d.get("kind") == "CustomResourceDefinition")
    v = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = strip(v["schema"]["openAPIV3Schema"])
    meta = {"group": crd["spec"]["group"], "kind": crd["spec"]["names"]["kind"], "version": version}
    with open(out, "w") as f:
        json.dump({"crd": meta, "schema": schema}, f, separators=(",", ":"), sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
