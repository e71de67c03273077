"""Conformance: every distcache.v1 RPC through a plain grpcio client (stubs
generated from the proto at run time), one scripted scenario per endpoint.

usage: conformance.py PROTO_DIR RUN_TAG HOST:PORT
Prints one JSON object: the scenario's results, with nothing in them that
depends on the topology (names, addresses and tokens are compared as
relations), so a single node and every member of a cluster must print the
same object.
"""
import json
import sys

import grpc

import stubs

proto_dir, tag, addr = sys.argv[1], sys.argv[2], sys.argv[3]
pb, rpc = stubs.load(proto_dir)

channel = grpc.insecure_channel(addr)
cache = rpc.CacheStub(channel)
cols = rpc.CollectionsStub(channel)
locks = rpc.LocksStub(channel)
cluster = rpc.ClusterStub(channel)
T = 20
R = {}


def err(call):
    """(status code, distcache-reason) of a call that must fail."""
    try:
        call()
    except grpc.RpcError as e:
        reasons = [v for k, v in (e.trailing_metadata() or ()) if k == "distcache-reason"]
        return [e.code().name, reasons[0] if reasons else None]
    return ["OK", None]


name = "conformance"  # one name: partitions (and so key order) match everywhere
c1 = cols.GetOrCreate(pb.GetOrCreateCollectionRequest(name=name), timeout=T)
c2 = cols.GetOrCreate(pb.GetOrCreateCollectionRequest(name=name, max_entries=5), timeout=T)
R["create"] = [c1.created, c2.created, c2.settings.max_entries]
R["exists"] = cols.Exists(pb.CollectionExistsRequest(name=name), timeout=T).exists
R["listed"] = name in [c.name for c in cols.List(pb.ListCollectionsRequest(), timeout=T).collections]

for i in range(50):
    cache.Put(pb.PutRequest(collection=name, key=f"k{i}".encode(), value=f"v{i}".encode()), timeout=T)
g = cache.Get(pb.GetRequest(collection=name, key=b"k7"), timeout=T)
m = cache.Get(pb.GetRequest(collection=name, key=b"missing"), timeout=T)
R["get"] = [g.found, g.value.decode(), m.found]
R["delete"] = [cache.Delete(pb.DeleteRequest(collection=name, key=b"k3"), timeout=T).deleted,
               cache.Delete(pb.DeleteRequest(collection=name, key=b"k3"), timeout=T).deleted]
cache.PutMany(pb.PutManyRequest(collection=name, entries=[
    pb.KeyValue(key=f"m{i}".encode(), value=f"w{i}".encode()) for i in range(20)]), timeout=T)
asked = [b"m5", b"k10", b"nope", b"m0", b"k49", b"m19", b"k3", b"m7"]
gm = cache.GetMany(pb.GetManyRequest(collection=name, keys=asked), timeout=T)
R["get_many"] = [[e.key.decode(), e.value.decode()] for e in gm.entries]
R["delete_many"] = cache.DeleteMany(pb.DeleteManyRequest(
    collection=name, keys=[b"m1", b"m2", b"nope", b"k4"]), timeout=T).deleted
R["size"] = cache.Size(pb.SizeRequest(collection=name), timeout=T).size
keys, token, pages = [], b"", 0
while True:
    page = cache.Keys(pb.KeysRequest(collection=name, page_size=9, page_token=token), timeout=T)
    assert len(page.keys) <= 9, len(page.keys)
    keys += [k.decode() for k in page.keys]
    pages += 1
    token = page.next_page_token
    if not token:
        break
R["keys"] = keys
R["keys_pages_over_one"] = pages > 1

# Atomic operations.
R["atomic"] = [
    cache.PutIfAbsent(pb.PutIfAbsentRequest(collection=name, key=b"once", value=b"a"), timeout=T).stored,
    cache.PutIfAbsent(pb.PutIfAbsentRequest(collection=name, key=b"once", value=b"b"), timeout=T).stored,
    cache.CompareAndSet(pb.CompareAndSetRequest(collection=name, key=b"once", expected=b"b", value=b"c"), timeout=T).swapped,
    cache.CompareAndSet(pb.CompareAndSetRequest(collection=name, key=b"once", expected=b"a", value=b"c"), timeout=T).swapped,
    cache.Increment(pb.IncrementRequest(collection=name, key=b"n", delta=7), timeout=T).value,
    cache.Increment(pb.IncrementRequest(collection=name, key=b"n", delta=-10), timeout=T).value,
    err(lambda: cache.Increment(pb.IncrementRequest(collection=name, key=b"once", delta=1), timeout=T)),
]
cache.Delete(pb.DeleteRequest(collection=name, key=b"once"), timeout=T)
cache.Delete(pb.DeleteRequest(collection=name, key=b"n"), timeout=T)

# The Batch stream: results by id, in any order.
def batch():
    yield pb.BatchRequest(commands=[
        pb.Command(id=1, put=pb.PutRequest(collection=name, key=b"b1", value=b"x")),
        pb.Command(id=2, get=pb.GetRequest(collection=name, key=b"k10")),
        pb.Command(id=3, delete=pb.DeleteRequest(collection=name, key=b"k11")),
        # Commands of one Batch message run concurrently: none depends on another.
        pb.Command(id=4, get_many=pb.GetManyRequest(collection=name, keys=[b"k20", b"none", b"k13", b"k12"])),
        pb.Command(id=5, get=pb.GetRequest(collection="no-such-collection", key=b"k")),
    ])
got = {}
for resp in cache.Batch(batch(), timeout=T):
    for r in resp.results:
        got[r.id] = r
    if len(got) == 5:
        break
R["batch"] = [
    got[1].WhichOneof("result"),
    [got[2].get.found, got[2].get.value.decode()],
    got[3].delete.deleted,
    [e.key.decode() for e in got[4].get_many.entries],
    pb.ErrorReason.Name(got[5].error.reason),
]

R["batch_put_visible"] = cache.Get(pb.GetRequest(collection=name, key=b"b1"), timeout=T).found

R["clear"] = cache.Clear(pb.ClearRequest(collection=name), timeout=T).removed
R["size_after_clear"] = cache.Size(pb.SizeRequest(collection=name), timeout=T).size
R["keys_after_clear"] = len(cache.Keys(pb.KeysRequest(collection=name), timeout=T).keys)

# Locks.
lk = b"conformance-lock"
t1 = locks.TryAcquire(pb.TryAcquireLockRequest(key=lk, hold_timeout_ms=30000), timeout=T)
t2 = locks.TryAcquire(pb.TryAcquireLockRequest(key=lk, hold_timeout_ms=30000), timeout=T)
ext = locks.Extend(pb.ExtendLockRequest(key=lk, fencing_token=t1.grant.fencing_token, hold_timeout_ms=40000), timeout=T)
wrong = err(lambda: locks.Release(pb.ReleaseLockRequest(key=lk, fencing_token=t1.grant.fencing_token + 1000), timeout=T))
locks.Release(pb.ReleaseLockRequest(key=lk, fencing_token=t1.grant.fencing_token), timeout=T)
fr1 = locks.ForceRelease(pb.ForceReleaseLockRequest(key=lk), timeout=T).released
a = locks.Acquire(pb.AcquireLockRequest(key=lk, hold_timeout_ms=30000, acquire_timeout_ms=1000), timeout=T)
fr2 = locks.ForceRelease(pb.ForceReleaseLockRequest(key=lk), timeout=T).released
R["locks"] = [t1.acquired, t2.acquired, ext.hold_ms, wrong, fr1,
              a.fencing_token > t1.grant.fencing_token, fr2]

# Errors.
R["errors"] = {
    "unknown_collection": err(lambda: cache.Get(pb.GetRequest(collection="no-such-collection", key=b"k"), timeout=T)),
    "key_too_big": err(lambda: cache.Put(pb.PutRequest(collection=name, key=b"K" * 100_000, value=b"v"), timeout=T)),
    "lock_key_too_big": err(lambda: locks.TryAcquire(pb.TryAcquireLockRequest(key=b"L" * 100_000), timeout=T)),
    "bad_page_token": err(lambda: cache.Keys(pb.KeysRequest(collection=name, page_token=b"x"), timeout=T)),
}
raw = channel.unary_unary("/distcache.v1.Cache/Put", request_serializer=None, response_deserializer=None)
R["errors"]["malformed_protobuf"] = err(lambda: raw(b"\xff\xff\xff\xff\x0f", timeout=T))

# Cluster info (topology-independent parts).
table = cluster.PartitionTable(pb.PartitionTableRequest(), timeout=T)
health = cluster.Health(pb.HealthRequest(), timeout=T)
R["cluster"] = [table.partition_count, health.partition_count, health.quorum,
                len(table.partitions) == table.partition_count]

R["delete_collection"] = [cols.Delete(pb.DeleteCollectionRequest(name=name), timeout=T).deleted,
                          cols.Exists(pb.CollectionExistsRequest(name=name), timeout=T).exists]
print(json.dumps(R, sort_keys=True))
