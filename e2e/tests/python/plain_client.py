"""A plain grpcio client: stubs generated from distcache's proto files at run time.

usage: plain_client.py HOST:PORT PROTO_DIR
"""
import sys

import grpc

import stubs

addr, proto_dir = sys.argv[1], sys.argv[2]
pb, rpc = stubs.load(proto_dir)

channel = grpc.insecure_channel(addr)
cache = rpc.CacheStub(channel)
cache.Put(pb.PutRequest(key=b"from-python", value=b"hello from grpcio"), timeout=10)
got = cache.Get(pb.GetRequest(key=b"from-python"), timeout=10)
assert got.found and got.value == b"hello from grpcio", got

# Errors carry a machine-readable reason in the metadata.
try:
    cache.Get(pb.GetRequest(collection="no-such-collection", key=b"k"), timeout=10)
    raise SystemExit("expected COLLECTION_NOT_FOUND")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.NOT_FOUND, e.code()
    reasons = [v for k, v in e.trailing_metadata() if k == "distcache-reason"]
    assert reasons == ["COLLECTION_NOT_FOUND"], e.trailing_metadata()

# A Batch stream from a plain client: its answers come by id, and its
# initial metadata advises how many Batch streams to open (the node's
# worker threads: the test's node runs one).
call = cache.Batch(
    iter([pb.BatchRequest(commands=[pb.Command(id=7, get=pb.GetRequest(key=b"from-python"))])]),
    timeout=10,
)
results = [r for resp in call for r in resp.results]
assert [r.id for r in results] == [7], results
assert results[0].get.found and results[0].get.value == b"hello from grpcio", results
advice = dict(call.initial_metadata()).get("x-distcache-batch-streams")
assert advice == "1", call.initial_metadata()

locks = rpc.LocksStub(channel)
grant = locks.TryAcquire(pb.TryAcquireLockRequest(key=b"py-lock", hold_timeout_ms=5000), timeout=10)
assert grant.acquired and grant.grant.fencing_token > 0, grant
print("OK")
