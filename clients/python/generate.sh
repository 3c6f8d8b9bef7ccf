#!/usr/bin/env bash
# Regenerates the protobuf/gRPC stubs of spiffe_broker_client from the broker's API
# (proto/spiffe_broker/v1/broker.proto) with grpcio-tools (pinned in
# requirements-dev.txt: the newest 1.85.x, whose protoc matches protobuf 7.x).
#
#   clients/python/generate.sh            rewrite the committed stubs
#   clients/python/generate.sh --check    fail if the committed stubs are not current
#
# PYTHON (default: python3) must have grpcio-tools installed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
pkg="$here/src/spiffe_broker_client/proto"
python="${PYTHON:-python3}"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$python" -m grpc_tools.protoc -I "$repo/proto" \
    --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
    "$repo/proto/spiffe_broker/v1/broker.proto"

out="$tmp/out"
mkdir -p "$out"
gen="$tmp/spiffe_broker/v1"
cp "$gen/broker_pb2.py" "$gen/broker_pb2.pyi" "$out/"
# The plugin writes an absolute import (`from spiffe_broker.v1 import broker_pb2`) that
# only works with the proto root on sys.path; the stubs live inside this package.
sed 's/^from spiffe_broker\.v1 import broker_pb2 as /from . import broker_pb2 as /' \
    "$gen/broker_pb2_grpc.py" > "$out/broker_pb2_grpc.py"
grep -q '^from \. import broker_pb2 as ' "$out/broker_pb2_grpc.py" \
    || { echo "generate.sh: the grpc stub's import was not rewritten" >&2; exit 1; }

if [ "${1:-}" = "--check" ]; then
    for f in broker_pb2.py broker_pb2.pyi broker_pb2_grpc.py; do
        if ! cmp -s "$out/$f" "$pkg/$f"; then
            echo "generate.sh: $pkg/$f is not current; run clients/python/generate.sh" >&2
            diff -u "$pkg/$f" "$out/$f" | head -20 >&2 || true
            exit 1
        fi
    done
    echo "stubs current (grpcio-tools $("$python" -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))'))"
else
    cp "$out"/broker_pb2.py "$out"/broker_pb2.pyi "$out"/broker_pb2_grpc.py "$pkg/"
    echo "wrote $pkg/{broker_pb2.py,broker_pb2.pyi,broker_pb2_grpc.py}"
fi
