"""The embedded local cloud: with no --cloud, the edge agent starts the cloud tier itself on 127.0.0.1 (local Ray,
the Serve app and the gRPC front, cloud.server.start_local) and stops it on exit, so that one command runs the
whole system on one machine.

This is the one module of edge/ that imports cloud/: an edge install without the cloud stack (Ray) runs every
other part of the agent against a remote cloud.

    cloud = start_embedded_cloud("models/rapnet-cifar10.pt")   # returns once the front is SERVING
    cloud.address, cloud.token                                 # where and how the agent connects
    cloud.stop()
"""
from __future__ import annotations

import os


class EmbeddedCloudError(RuntimeError):
    """The embedded cloud did not start; the message says why and what to do."""


def start_embedded_cloud(checkpoint: str | os.PathLike):
    """Serve `checkpoint` on 127.0.0.1 at a free port with a fresh token, in a local Ray instance of this process.
    Returns the running cloud.server.CloudServer (address, token, stop())."""
    try:
        from cloud.server import StartError, start_local
    except ImportError as err:
        raise EmbeddedCloudError(f"the embedded cloud needs the cloud stack ({err}); install it, or give a "
                                 f"remote cloud with --cloud HOST:PORT") from None
    try:
        return start_local(checkpoint, port=0)
    except StartError as err:
        raise EmbeddedCloudError(f"the local cloud tier did not start: {err}") from None
