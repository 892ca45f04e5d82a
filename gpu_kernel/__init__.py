"""Code that runs on (or reaches) a GPU host: the launcher, the kernel itself and the SSH client.

Imported by ``broker`` (probe, fencing) and ``provisioner`` (launch, tunnels); imports neither.
"""

__version__ = "0.1.0"
