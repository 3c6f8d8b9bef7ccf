"""Generated protobuf/gRPC stubs of proto/spiffe_broker/v1/broker.proto.

Public for callers who need an RPC the client does not wrap (e.g. the Admin service):

    from spiffe_broker_client.proto import broker_pb2, broker_pb2_grpc

Do not edit the broker_pb2* files by hand: ``clients/python/generate.sh`` writes them and
CI (``generate.sh --check``) fails on any difference.
"""
