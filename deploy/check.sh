#!/usr/bin/env bash
# Checks the deployment files with the tools that read them:
# - systemd-analyze verify: the socket and service units load without a
#   warning (ExecStart pointed at the daemon binary given as $1);
# - systemd-analyze security --offline: the service's exposure stays at or
#   below THRESHOLD (on the tool's 0-100 scale: 10 is the "1.0" it prints);
# - the Kubernetes manifest parses as YAML and its entry script as sh.
# Usage: deploy/check.sh PATH/TO/vhost-user-iommu
set -euo pipefail
# The binary's path is taken relative to where the script was called from.
BIN=$(realpath "${1:?usage: deploy/check.sh PATH/TO/vhost-user-iommu}")
cd "$(dirname "$0")"
THRESHOLD=${THRESHOLD:-10}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s#/usr/local/bin/vhost-user-iommu#$BIN#" vhost-user-iommu@.service >"$tmp/vhost-user-iommu@.service"
cp vhost-user-iommu@.socket "$tmp/"

echo "systemd-analyze verify"
systemd-analyze verify "$tmp/vhost-user-iommu@.service" "$tmp/vhost-user-iommu@.socket" >"$tmp/verify.out" 2>&1 || true
if [ -s "$tmp/verify.out" ]; then
    cat "$tmp/verify.out"
    echo "the units do not load cleanly" >&2
    exit 1
fi

echo "systemd-analyze security (threshold $THRESHOLD)"
systemd-analyze security --offline=true vhost-user-iommu@.service | tail -1
if ! systemd-analyze security --offline=true --threshold="$THRESHOLD" vhost-user-iommu@.service >/dev/null; then
    echo "the service's exposure rose above $THRESHOLD (deploy/README.md has the recorded score)" >&2
    exit 1
fi

echo "k8s/daemonset.yaml"
python3 - k8s/daemonset.yaml >"$tmp/entry.sh" <<'PY'
import sys, yaml
docs = list(yaml.safe_load_all(open(sys.argv[1])))
kinds = [d["kind"] for d in docs]
assert kinds == ["ConfigMap", "DaemonSet"], kinds
ds = docs[1]["spec"]["template"]["spec"]
assert ds["securityContext"]["runAsNonRoot"] is True
assert ds["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
for c in ds["containers"]:
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], c["name"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
print(docs[0]["data"]["entry.sh"])
PY
sh -n "$tmp/entry.sh"
echo "deploy files OK"
