"""The Ray cluster: each env replica is a Ray actor that runs a servlet.

    client ── RayCluster._launch(env) ── actor options from env.compute,
      │                                  runtime_env from reqs / env_vars / working_dir
      │                                        │
      │                                        ▼
      │                           Ray places _ServletActor on a node
      │                           (its __init__ starts the servlet in a thread:
      │                            runmap.server.embedded, bound to the node's IP)
      │                                        │ address() -> host, port, pid, node, log
      ▼                                        ▼
    Servlet(Endpoint(host, port, keepalive), RayActorProcess) ── HTTP ──► the servlet

Ray does the placing, the installing and the process keeping; the calls use
runmap's own protocol, so a Mapper treats these replicas like any other and
may mix them with replicas on other clusters. Ray is imported only here, and
only when a RayCluster is made: ``import runmap`` does not import it.

Ray's exceptions are translated into runmap's tree in one place,
:func:`runmap.cluster.ray.actor.translate_errors`.
"""

from runmap.cluster.ray.cluster import RayCluster
from runmap.cluster.ray.servlet import RayActorProcess

__all__ = ["RayActorProcess", "RayCluster"]
