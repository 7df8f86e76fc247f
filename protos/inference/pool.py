"""The descriptor pool of the generated code in this folder: a private one, not protobuf's
default pool.

Triton's client (`tritonclient.grpc`), KServe's and MLServer's packages all register the same
`inference.*` messages in protobuf's default pool, and protobuf refuses a second definition of
a name there ("duplicate symbol 'inference.ServerLiveRequest'"): two of them cannot be
imported by one process. So `make protos` points the generated `*_pb2.py` here (`privatize`,
one import line), and memserve's copy of the protocol coexists with any other. The wire format
does not involve the pool at all; server reflection gets one pool of both (`reflection_pool`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

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


def reflection_pool(files: Iterable[Any]) -> descriptor_pool.DescriptorPool:
    """A new pool with these files (and what they import), for server reflection, which
    looks in one pool: memserve.v1, health and reflection live in the default pool, the
    inference API in this folder's."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: Any) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for file in files:
        add(file)
    return pool


def main(paths: list[str]) -> int:
    """`python -m protos.inference.pool FILE...`: privatize the files in place."""
    for path in map(Path, paths):
        path.write_text(privatize(path.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
