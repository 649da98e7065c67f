"""paramserver: a parameter server for distributed machine learning.

A C++ core holds sharded parameter blocks and applies ``torch.optim``-exact updates; servers expose
it over gRPC; workers push gradients and pull weights through :func:`connect`::

    import paramserver as ps
    with ps.connect() as client:                 # PARAMSERVER_SCHEDULER, set by `paramserver launch`
        w = client.dense("fc1.weight", shape=(784, 256), optimizer=ps.Adam(lr=1e-3))
        w.push(grad)
        weights = w.pull()
"""

from paramserver import federated, init
from paramserver.client import Client, DenseTable, EmbeddingTable, connect
from paramserver.config import ClientConfig, SchedulerConfig, Security, ServerConfig
from paramserver.errors import (
    AuthenticationError,
    CheckpointError,
    InvalidRequestError,
    NodeUnavailableError,
    ParamServerError,
    PermissionDeniedError,
    PSTimeoutError,
    ResourceExhaustedError,
    RoundClosedError,
    TableMismatchError,
    TableNotFoundError,
)
from paramserver.export import EmbeddingLookup, load_model, load_model_info
from paramserver.optim import SGD, Adagrad, Adam, AdamW, FedAdagrad, FedAdam, Optimizer
from paramserver.scheduler import Scheduler
from paramserver.server import Server

__version__ = "0.1.0"

__all__ = [
    "SGD", "Adagrad", "Adam", "AdamW", "FedAdam", "FedAdagrad", "Optimizer",
    "init", "federated", "Client", "DenseTable", "EmbeddingTable", "connect",
    "Scheduler", "Server", "SchedulerConfig", "ServerConfig", "ClientConfig", "Security",
    "ParamServerError", "InvalidRequestError", "NodeUnavailableError", "PSTimeoutError",
    "TableMismatchError", "TableNotFoundError", "CheckpointError", "AuthenticationError",
    "PermissionDeniedError",
    "ResourceExhaustedError", "RoundClosedError", "load_model", "load_model_info", "EmbeddingLookup",
    "__version__",
]
