# JupyterHub configuration for a shared NVIDIA GPU host with gpuspawner.
#
# Every setting a lab usually changes comes from an environment variable, so the same file
# serves a real GPU host and the simulated demo. Unset variables keep the defaults shown.
#
#   GPUSPAWNER_IMAGE          single-user image (default: quay.io/jupyter/base-notebook)
#   GPUSPAWNER_POLICY         policy file (limits per user/group; docs/policy.md)
#   GPUSPAWNER_INVENTORY      auto | nvml | nvidia-smi | file | none   (default: auto)
#   GPUSPAWNER_TOPOLOGY       static topology file, for a hub that cannot see the GPUs
#   GPUSPAWNER_PORTS          host port range for extra ports, "40000-40999"
#   GPUSPAWNER_EVENTS         operation log (JSON lines)
#   GPUSPAWNER_HUB_ID         this hub's id in the ds01.hub label (default: jupyterhub)
#   GPUSPAWNER_HUB_CONNECT_IP address containers reach the hub on (the Docker bridge gateway)
#   GPUSPAWNER_ADMINS         comma-separated admin user names
import os

c = get_config()  # noqa: F821 - provided by JupyterHub

env = os.environ.get

c.JupyterHub.spawner_class = "gpu"  # gpuspawner.GPUSpawner, through its entry point

# Containers reach the hub through the Docker bridge; the hub reaches them on 127.0.0.1.
c.JupyterHub.hub_ip = "0.0.0.0"
if env("GPUSPAWNER_HUB_CONNECT_IP"):
    c.JupyterHub.hub_connect_ip = env("GPUSPAWNER_HUB_CONNECT_IP")
c.DockerSpawner.host_ip = "127.0.0.1"
c.JupyterHub.allow_named_servers = True

c.DockerSpawner.image = env("GPUSPAWNER_IMAGE", "quay.io/jupyter/base-notebook:latest")
# Keep stopped containers: that is what holds a student's slice for gpu_hold_after_stop.
c.DockerSpawner.remove = False
c.DockerSpawner.volumes = {"jupyterhub-user-{username}": "/home/jovyan/work"}
c.Spawner.start_timeout = 180

c.GPUSpawner.hub_id = env("GPUSPAWNER_HUB_ID", "jupyterhub")
c.GPUSpawner.inventory_source = env("GPUSPAWNER_INVENTORY", "auto")
if env("GPUSPAWNER_TOPOLOGY"):
    c.GPUSpawner.topology_file = env("GPUSPAWNER_TOPOLOGY")
if env("GPUSPAWNER_POLICY"):
    c.GPUSpawner.policy_file = env("GPUSPAWNER_POLICY")
if env("GPUSPAWNER_EVENTS"):
    c.GPUSpawner.events_file = env("GPUSPAWNER_EVENTS")
low, _, high = env("GPUSPAWNER_PORTS", "40000-40999").partition("-")
c.GPUSpawner.port_range = (int(low), int(high))

# Extra ports each server publishes (host ports are chosen from port_range).
c.GPUSpawner.ports = {"tensorboard": 6006}

# What students choose from. Profiles their policy forbids are not shown to them.
c.GPUSpawner.profile_list = [
    {
        "display_name": "CPU only",
        "slug": "cpu",
        "description": "No GPU: for writing code and small experiments.",
        "default": True,
    },
    {
        "display_name": "Small GPU slice (MIG 1g.10gb)",
        "slug": "mig-1g",
        "description": "One seventh of an A100/H100, 10 GB of GPU memory.",
        "gpu": {"mig_profile": "1g.10gb"},
    },
    {
        "display_name": "Medium GPU slice (MIG 3g.40gb)",
        "slug": "mig-3g",
        "description": "Three sevenths of an A100/H100, 40 GB of GPU memory.",
        "gpu": {"mig_profile": "3g.40gb"},
    },
    {
        "display_name": "Whole GPU",
        "slug": "gpu-1",
        "description": "One full GPU (MIG off). Needs allow_full_gpu in your policy.",
        "gpu": {"gpus": 1},
    },
]

admins = {name.strip() for name in env("GPUSPAWNER_ADMINS", "").split(",") if name.strip()}
if admins:
    c.Authenticator.admin_users = admins
