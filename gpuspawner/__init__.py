"""gpuspawner: a JupyterHub spawner for shared NVIDIA GPU servers."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # The spawner pulls in JupyterHub and DockerSpawner; the pure core and the CLI should not.
    if name == "GPUSpawner":
        from .spawner import GPUSpawner

        return GPUSpawner
    raise AttributeError(name)
