#!/bin/sh
# SPIRE registration entries for the broker and the demo workloads (run on the SPIRE
# server; PARENT is the node's agent SPIFFE ID). Kubernetes clusters using the SPIRE
# Controller Manager use deploy/kubernetes/clusterspiffeid.yaml for the broker instead.
set -eu
TD=${TRUST_DOMAIN:-example.org}
PARENT=${PARENT:-spiffe://$TD/spire/agent/k8s_psat/prod/node-1}

entry() { # spiffe-id selector...
    id=$1; shift
    set -- spire-server entry create -parentID "$PARENT" -spiffeID "spiffe://$TD/$id" \
        -x509SVIDTTL 3600 -jwtSVIDTTL 300 $(printf -- '-selector %s ' "$@")
    "$@"
}

# The broker itself (its SVID serves gRPC mTLS; its JWT-SVID logs into Vault).
entry spiffe-broker k8s:ns:spiffe-broker k8s:sa:spiffe-broker
# Demo workloads (deploy/demo-config.toml identities).
entry ci/deploy-agent k8s:ns:ci k8s:sa:deploy-agent
entry ml/model-runtime k8s:ns:serving k8s:sa:model-runtime
entry gpu/provisioner k8s:ns:gpu k8s:sa:provisioner
# Humans' approval tools and the platform admin CLI run with their own SVIDs.
entry ops/alice unix:uid:1001
entry ops/bob unix:uid:1002
entry ops/root unix:uid:1000
