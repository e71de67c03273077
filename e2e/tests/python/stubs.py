"""Generates the distcache.v1 stubs from the proto files at run time (a
plain client's view: nothing of distcache's own code) and imports them."""

import importlib
import sys
import tempfile

from grpc_tools import protoc


def load(proto_dir):
    """(messages module, services module) of distcache/v1/distcache.proto."""
    out = tempfile.mkdtemp()
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}",
                      "distcache/v1/distcache.proto"])
    assert rc == 0, "protoc failed"
    sys.path.insert(0, out)
    return (importlib.import_module("distcache.v1.distcache_pb2"),
            importlib.import_module("distcache.v1.distcache_pb2_grpc"))
