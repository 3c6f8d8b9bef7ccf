#!/usr/bin/env python3
"""Calling spiffe-broker from *stock* grpcio, without spiffe_broker_client.

The SVID and bundle come from the Workload API (py-spiffe); grpcio does the mTLS. grpcio
can only check a host name, so the broker's certificate must carry one (`spiffe-broker dev`
adds DNS:localhost; with SPIRE, the broker's registration entry's dnsNames) and the
channel is told which name to expect. It CANNOT check the broker's SPIFFE ID: any
certificate of the trust domain carrying that DNS name is accepted as the broker.
See docs/clients.md.

    SPIFFE_ENDPOINT_SOCKET=unix:///tmp/sb/workloads/deploy-agent.sock \
    SPIFFE_BROKER_ADDR=127.0.0.1:8443 python3 clients/python/examples/stock_grpcio.py
"""

import os

import grpc
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from spiffe import WorkloadApiClient

# Stubs generated from proto/spiffe_broker/v1/broker.proto (grpc_tools.protoc); these are
# the ones the package ships.
from spiffe_broker_client.proto import broker_pb2 as pb, broker_pb2_grpc as pb_grpc

with WorkloadApiClient(os.environ["SPIFFE_ENDPOINT_SOCKET"]) as workload_api:
    ctx = workload_api.fetch_x509_context()
svid, bundle = ctx.default_svid, ctx.x509_bundle_set.get_bundle_for_trust_domain(ctx.default_svid.spiffe_id.trust_domain)
creds = grpc.ssl_channel_credentials(
    root_certificates=b"".join(c.public_bytes(Encoding.PEM) for c in bundle.x509_authorities),
    private_key=svid.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()),
    certificate_chain=b"".join(c.public_bytes(Encoding.PEM) for c in svid.cert_chain),
)
addr = os.environ.get("SPIFFE_BROKER_ADDR", "127.0.0.1:8443")
# grpcio checks this DNS name in the broker's certificate (not its SPIFFE ID).
with grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
    resp = pb_grpc.CredentialBrokerStub(ch).IssueCredential(pb.IssueCredentialRequest(
        profile="gpu-scheduler-submit", scopes=["job:submit"], ttl={"seconds": 600},
        intent=pb.Intent(action="submit-training", target="queue/a100")), timeout=30)
print(f"lease {resp.lease.id} scopes {list(resp.lease.scopes)} token {len(resp.credential.token.jwt)} bytes")
