"""The descriptor pool of the generated code in this folder: a private one, not protobuf's
default pool.

Triton's client (`tritonclient.grpc`), KServe's and MLServer's packages all register the same
`inference.*` messages in protobuf's default pool, and protobuf refuses a second definition of
a name there ("duplicate symbol 'inference.ServerLiveRequest'"): two of them cannot be
imported by one process. So `make protos` points the generated `*_pb2.py` here (`privatize`,
one import line), and memserve's copy of the protocol coexists with any other. The wire format
does not involve the pool at all. `serving.kserve` gives server reflection this pool.
"""

from __future__ import annotations

import sys
from pathlib import Path

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()

GENERATED_IMPORT = "from google.protobuf import descriptor_pool as _descriptor_pool\n"
PRIVATE_IMPORT = "from protos.inference import pool as _descriptor_pool  # a private pool\n"


def Default() -> descriptor_pool.DescriptorPool:  # noqa: N802 - stands in for protobuf's
    """What the generated code asks for as `_descriptor_pool.Default()`: this folder's pool."""
    return POOL


def privatize(generated: str) -> str:
    """protoc's `*_pb2.py` text, with its descriptors added to `POOL` instead of the default."""
    if generated.count(GENERATED_IMPORT) != 1:
        raise ValueError("not protoc's Python output: its descriptor_pool import is missing")
    return generated.replace(GENERATED_IMPORT, PRIVATE_IMPORT)


def main(paths: list[str]) -> int:
    """`python -m protos.inference.pool FILE...`: privatize the files in place."""
    for path in map(Path, paths):
        path.write_text(privatize(path.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
