#!/bin/sh
# SPIRE registration entries for the broker and the demo workloads (run on the SPIRE
# server; PARENT is the node's agent SPIFFE ID). Kubernetes clusters using the SPIRE
# Controller Manager use deploy/kubernetes/clusterspiffeid.yaml for the broker instead.
set -eu
TD=${TRUST_DOMAIN:-example.org}
PARENT=${PARENT:-spiffe://$TD/spire/agent/k8s_psat/prod/node-1}

entry() { # spiffe-id selector... [dns:NAME...]
    id=$1; shift
    args=""
    for a in "$@"; do
        case $a in
            dns:*) args="$args -dns ${a#dns:}" ;;
            *) args="$args -selector $a" ;;
        esac
    done
    # $args is split on purpose: one word per flag and value.
    spire-server entry create -parentID "$PARENT" -spiffeID "spiffe://$TD/$id" \
        -x509SVIDTTL 3600 -jwtSVIDTTL 300 $args
}

# The broker itself (its SVID serves gRPC mTLS; its JWT-SVID logs into Vault). Its DNS
# names let stock gRPC clients, which check a host name first, connect (docs/clients.md).
entry spiffe-broker k8s:ns:spiffe-broker k8s:sa:spiffe-broker \
    dns:spiffe-broker.spiffe-broker.svc dns:spiffe-broker.spiffe-broker.svc.cluster.local
# Demo workloads (deploy/demo-config.toml identities).
entry ci/deploy-agent k8s:ns:ci k8s:sa:deploy-agent
entry ml/model-runtime k8s:ns:serving k8s:sa:model-runtime
entry gpu/provisioner k8s:ns:gpu k8s:sa:provisioner
# Humans' approval tools and the platform admin CLI run with their own SVIDs.
entry ops/alice unix:uid:1001
entry ops/bob unix:uid:1002
entry ops/root unix:uid:1000
