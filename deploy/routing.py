"""Where unpinned requests go (issue 18): each model's route, read from the run folder's state
file by Kiln's OIP plugin (deploy/oip_plugin, Router.java) inside TorchServe's JVM.

The plugin picks the version of an unpinned OIP infer itself, and tells the front proxy the
version of an unpinned REST prediction (nginx asks it per request, deploy/nginx/nginx.conf), so
a route change needs neither a restart nor a reload of the front proxy, which would close
kept-alive client connections (loadtests/studies/reload_keepalive.py: 8 reloads under 16 wrk
connections reset 30 of them). Kiln's admin commands write the file (deploy/versions.py);
nothing here writes it.

Per model it says {"versions": {...}, "default": V, "previous": V|null,
"route": {V: weight, ...}|null, "shadows": {...}}: the route's positive weights split the
unpinned requests, a null route sends them all to the default. A client's ROUTING_KEY_HEADER
always lands on the same version of a route (the key's CRC-32 against the weights).
"""

from pathlib import Path

from kiln.deploy import versions

# The JVM system property (set in vmargs) with the state file's path.
STATE_PROPERTY = "kiln.route.state"
# As Router.KEY_HEADER and OipRoutes.ROUTE_PREFIX, ROUTE_HEADER, REFUSED_PREFIX, SYNC_PATH.
ROUTING_KEY_HEADER = "X-Kiln-Routing-Key"
ROUTE_PREFIX = "/kiln-route/"
ROUTE_HEADER = "X-Kiln-Route-Version"
REFUSED_PREFIX = "/kiln-refused/"
SYNC_PATH = "/kiln-route-sync"
# As OipRoutes.SHADOW_HEADER and SHADOW_PREFIX: the versions that shadow a REST prediction,
# which the front proxy then mirrors to the plugin (Shadow.java scores them).
SHADOW_HEADER = "X-Kiln-Shadow"
SHADOW_PREFIX = "/kiln-shadow/"
# As OipRoutes.SHADOWED_HEADER: on a sampled answer, the versions it was sampled for.
SHADOWED_HEADER = "X-Kiln-Shadowed"


def state_file(run_dir: Path) -> Path:
    """The state file's absolute path: nginx and the JVM run from other folders."""
    return versions.state_file(run_dir).resolve()


def nginx_variable(header: str) -> str:
    """nginx's name for a header of an upstream's answer, after $upstream_http_."""
    return header.lower().replace("-", "_")
