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
#   GPUSPAWNER_START_TIMEOUT  seconds a spawn may take (Spawner.start_timeout, default: 180);
#                             the gpuspawner CLI reads it too, to see spawns in flight alike
#   GPUSPAWNER_HUB_CONNECT_IP address containers reach the hub on (the Docker bridge gateway)
#   GPUSPAWNER_ADMINS         comma-separated admin user names
#   GPUSPAWNER_NETWORK        Docker network the servers join (docker-compose.yml)
#   GPUSPAWNER_BIND_URL       public URL the proxy listens on (default: http://:8000)
#   GPUSPAWNER_VOLUMES        "0" to give servers no persistent home volume
#   GPUSPAWNER_CULL_IDLE      seconds after which idle servers are stopped (idle culler)
#   GPUSPAWNER_HOSTS          YAML file of GPU hosts (name: Docker endpoint, or name: {url:,
#                             address:, tls_ca:, tls_cert:, tls_key:}; docs/scaling.md); the
#                             gpuspawner command reads the same variable
#   GPUSPAWNER_STRATEGY       pack | spread: which GPU (and host) a new server takes first
#   GPUSPAWNER_DEMO_USERS     demo only: comma-separated users of a shared-password login
#   GPUSPAWNER_DEMO_PASSWORD  demo only: that password (never on a real host)
import importlib.util
import os
import sys

c = get_config()  # noqa: F821 - provided by JupyterHub

env = os.environ.get

c.JupyterHub.spawner_class = "gpu"  # gpuspawner.GPUSpawner, through its entry point

# Containers reach the hub through the Docker bridge; the hub reaches them on 127.0.0.1.
c.JupyterHub.hub_ip = "0.0.0.0"
if env("GPUSPAWNER_HUB_CONNECT_IP"):
    c.JupyterHub.hub_connect_ip = env("GPUSPAWNER_HUB_CONNECT_IP")
c.DockerSpawner.host_ip = "127.0.0.1"
if env("GPUSPAWNER_NETWORK"):
    # A hub in a container: servers join its network and are reached by their address.
    c.DockerSpawner.network_name = env("GPUSPAWNER_NETWORK")
    c.DockerSpawner.use_internal_ip = True
c.JupyterHub.allow_named_servers = True

c.DockerSpawner.image = env("GPUSPAWNER_IMAGE", "quay.io/jupyter/base-notebook:latest")
# Keep stopped containers: that is what holds a student's slice for gpu_hold_after_stop.
c.DockerSpawner.remove = False
if env("GPUSPAWNER_VOLUMES", "1") != "0":
    # The whole home on a volume: nothing a student keeps there depends on the container
    # (which gpuspawner replaces, saving it first, when its GPU slice is gone after a reboot).
    c.DockerSpawner.volumes = {"jupyterhub-user-{username}": "/home/jovyan"}
if env("GPUSPAWNER_BIND_URL"):
    c.JupyterHub.bind_url = env("GPUSPAWNER_BIND_URL")
c.Spawner.start_timeout = int(env("GPUSPAWNER_START_TIMEOUT", "180"))

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
if env("GPUSPAWNER_HOSTS"):  # one hub, several GPU hosts (docs/scaling.md)
    import yaml

    with open(env("GPUSPAWNER_HOSTS")) as hosts_file:
        c.GPUSpawner.hosts = yaml.safe_load(hosts_file) or {}
if env("GPUSPAWNER_STRATEGY"):
    c.GPUSpawner.allocation_strategy = env("GPUSPAWNER_STRATEGY")

# Extra host ports per server: none by default. Web tools (TensorBoard, dashboards) are
# reached through jupyter-server-proxy at /user/<name>/proxy/6006/, behind the Hub's login;
# publish a host port only for what cannot go through HTTP, e.g. ssh (docs/spawner.md):
#   c.GPUSpawner.ports = {"ssh": 22}   # published on 127.0.0.1 unless ports_host_ip says
c.GPUSpawner.ports = {}

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

# The demo's login: a few named users sharing one password. A real hub configures its own
# authenticator (LDAP, OAuth, PAM) here instead.
if env("GPUSPAWNER_DEMO_USERS"):
    c.JupyterHub.authenticator_class = "dummy"
    c.DummyAuthenticator.password = env("GPUSPAWNER_DEMO_PASSWORD", "demo")
    c.Authenticator.allowed_users = {
        name.strip() for name in env("GPUSPAWNER_DEMO_USERS").split(",") if name.strip()
    }

c.JupyterHub.services = []
c.JupyterHub.load_roles = []

# The admin page, JSON API and metrics: a Hub-managed service at /services/gpu-allocations/.
if importlib.util.find_spec("gpuspawner.admin"):
    import gpuspawner.admin

    # The service reads the same settings as the spawner (passed from ``c``); the simulated
    # host's state file is passed on too when the demo runs on one.
    simulated = {"GPUSIM_STATE": env("GPUSIM_STATE")} if env("GPUSIM_STATE") else {}
    c.JupyterHub.services.append(gpuspawner.admin.service(c, environment=simulated))
    c.JupyterHub.load_roles.append(gpuspawner.admin.role())

# Stopping idle servers is jupyterhub-idle-culler's job; their slices are then held for the
# policy's gpu_hold_after_stop and freed after it.
if env("GPUSPAWNER_CULL_IDLE") and importlib.util.find_spec("jupyterhub_idle_culler"):
    c.JupyterHub.services.append({
        "name": "idle-culler",
        "command": [sys.executable, "-m", "jupyterhub_idle_culler",
                    f"--timeout={int(env('GPUSPAWNER_CULL_IDLE'))}"],
    })
    c.JupyterHub.load_roles.append({
        "name": "idle-culler",
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
        "services": ["idle-culler"],
    })
