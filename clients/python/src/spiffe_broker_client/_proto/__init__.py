"""Generated protobuf/gRPC stubs of proto/spiffe_broker/v1/broker.proto (see generate.sh).

Do not edit the broker_pb2* files by hand: CI regenerates them and fails on any difference.
"""
