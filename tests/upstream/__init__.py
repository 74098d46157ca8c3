"""DockerSpawner's own test suite, run against DockerSpawner and against GPUSpawner."""
